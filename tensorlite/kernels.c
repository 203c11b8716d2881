/* The C twins of tensorlite's hot non-matmul kernels: plain serial loops, fused so that
 * each pass reads its inputs once and makes no temporaries.
 *
 * Each kernel here is the loop form of a NumPy reference (tensorlite/kernels.py and
 * tensorlite/functional.py hold the spec); tensorlite/kernels_c.py compiles this file with
 * the system's C compiler, loads it with ctypes and gives every function the reference's
 * Python name and arguments. A learner can skip this file entirely.
 *
 * Rules the code keeps:
 * - Serial and thread-safe: no threads, no globals, no static buffers. Every output and
 *   scratch buffer is allocated by the caller (NumPy) and passed in, so several Python
 *   threads may call any kernel at once (ctypes releases the GIL during the call).
 * - Arrays are C-contiguous; sizes are int64_t; `real` is float or double: this file is
 *   read twice by the compiler (see the bottom of the first part), once for each.
 * - Compiled without -ffast-math: the flags allow reassociation (vectorized sums) but not
 *   "no NaNs/infs", so a NaN still reaches the loss and stops training, as in NumPy.
 * - Every array argument is `restrict`: no buffer a kernel writes overlaps another of its
 *   arguments (kernels_c.py makes sure). Without it the compiler vectorizes a loop twice
 *   and picks a version at run time by how close the buffers lie; the reassociated float
 *   sums then depend on where NumPy allocated them (rms_norm_backward's did: the same
 *   model built twice in one process differed by up to ~240 ulps after one step).
 */
#ifndef real /* ---- first pass: shared helpers, then the kernels once per type ---------- */

#include <math.h>
#include <stdint.h>

/* exp for float32, vectorizable. libm's expf is a scalar call, so a loop calling it does not
 * vectorize (numba has the same problem: docs/performance.md). This is the classic range
 * reduction plus polynomial (Cephes' expf): exp(x) = 2**n * exp(r), n = round(x / ln2),
 * |r| <= ln2 / 2, max relative error ~1.2e-7. 2**n is built in the exponent bits of a float.
 * Every step is a plain float operation, so a loop over it becomes SIMD code. */
static inline float exp_f32(float x)
{
    if (x < -87.33654f) x = -87.33654f; /* comparisons, not fminf: a NaN stays NaN */
    if (x > 88.37626f) x = 88.37626f;
    float n = floorf(x * 1.44269504f + 0.5f); /* x / ln2, rounded */
    float r = x - n * 0.693359375f - n * -2.12194440e-4f; /* x - n ln2, ln2 in two parts */
    float p = 1.9875691500e-4f;
    p = p * r + 1.3981999507e-3f;
    p = p * r + 8.3334519073e-3f;
    p = p * r + 4.1665795894e-2f;
    p = p * r + 1.6666665459e-1f;
    p = p * r + 5.0000001201e-1f;
    p = p * r * r + r + 1.0f; /* exp(r) */
    /* 2**n: adding 1.5 * 2**23 puts the integer n into the low mantissa bits (no float -> int
     * conversion, which is undefined for NaN); shift it into the exponent field. */
    union { float f; uint32_t u; } big = { n + 12582912.0f }, two_n;
    two_n.u = (big.u - 0x4B400000u + 127u) << 23;
    return p * two_n.f;
}

/* A target index in [-v, v), negative ones counting from the end (as NumPy indexing
 * does), as an index in [0, v); -1 if it is out of range. */
static inline int64_t wrap_index(int64_t k, int64_t v)
{
    k = k < 0 ? k + v : k;
    return k >= 0 && k < v ? k : -1;
}

/* float64 keeps libm's exp (full precision; float64 is the checking dtype, not the fast one). */
static inline double exp_f64(double x) { return exp(x); }

#define real float
#define EXP exp_f32
#define SQRT sqrtf
#define LOG logf
#define KERNEL(name) name##_f32
#include "kernels.c" /* this file again: the second part, for this `real` */
#undef real
#undef EXP
#undef SQRT
#undef LOG
#undef KERNEL

#define real double
#define EXP exp_f64
#define SQRT sqrt
#define LOG log
#define KERNEL(name) name##_f64
#include "kernels.c" /* this file again: the second part, for this `real` */
#undef real
#undef EXP
#undef SQRT
#undef LOG
#undef KERNEL

#else /* ---- second and third pass: the kernels, written once for `real` --------------- */

/* ---- relu(x)**2 ------------------------------------------------------------------------- */

/* y = max(x, 0)**2 over n values. */
void KERNEL(relu_squared)(const real *restrict x, real *restrict y, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        real r = x[i];
        y[i] = r <= 0 ? 0 : r * r; /* a NaN fails `<= 0` and stays NaN, as in np.maximum */
    }
}

/* dx = dout * 2 * max(x, 0). */
void KERNEL(relu_squared_backward)(const real *restrict dout, const real *restrict x,
                                   real *restrict dx, int64_t n)
{
    for (int64_t i = 0; i < n; i++) {
        real r = x[i];
        dx[i] = r <= 0 ? 0 : (r + r) * dout[i];
    }
}

/* ---- RMSNorm over rows of c features ------------------------------------------------------ */

/* y = x * r * w,  r = 1 / sqrt(mean(x**2) + eps) per row.  x, y (rows, c); w (c); r (rows). */
void KERNEL(rms_norm_forward)(const real *restrict x, const real *restrict w, real eps,
                              int64_t rows, int64_t c, real *restrict y, real *restrict r)
{
    for (int64_t i = 0; i < rows; i++) {
        const real *xi = x + i * c;
        real *yi = y + i * c;
        real ss = 0;
        for (int64_t j = 0; j < c; j++)
            ss += xi[j] * xi[j];
        real ri = 1 / SQRT(ss / c + eps);
        r[i] = ri;
        for (int64_t j = 0; j < c; j++)
            yi[j] = xi[j] * ri * w[j];
    }
}

/* With xhat = x * r and dxhat = dout * w:
 *   dx = r * (dxhat - xhat * mean(dxhat * xhat))   per row
 *   dw = sum over rows of dout * xhat              (dw is overwritten) */
void KERNEL(rms_norm_backward)(const real *restrict dout, const real *restrict x,
                               const real *restrict r, const real *restrict w, int64_t rows,
                               int64_t c, real *restrict dx, real *restrict dw)
{
    for (int64_t j = 0; j < c; j++)
        dw[j] = 0;
    for (int64_t i = 0; i < rows; i++) {
        const real *xi = x + i * c, *di = dout + i * c;
        real *dxi = dx + i * c;
        real ri = r[i], dot = 0;
        for (int64_t j = 0; j < c; j++) {
            real xhat = xi[j] * ri;
            dot += di[j] * w[j] * xhat;
            dw[j] += di[j] * xhat;
        }
        dot /= c; /* mean(dxhat * xhat) */
        for (int64_t j = 0; j < c; j++)
            dxi[j] = ri * (di[j] * w[j] - xi[j] * ri * dot);
    }
}

/* ---- causal attention: the passes between the matmuls ---------------------------------------
 * Scores are kept transposed, keys along rows: st[j][i] = k_j . q_i for key j, query i, so
 * P^T feeds both backward products without a copy. Query i sees keys j <= i: in row j the
 * visible entries are the columns i >= j. One call handles n (batch, head) matrices t x t. */

/* In place, per matrix: st -> P^T with P[i][j] = softmax over visible keys j of st[j][i] * scale
 * (scale > 0, so softmax(s * scale) = exp((s - max s) * scale) / sum). Entries of the future
 * (i < j) become 0. m, total: t values of scratch each (per query: the max over the visible
 * keys, then the sum; two arrays, not halves of one, so the compiler knows they are apart). */
void KERNEL(causal_softmax_columns)(real *restrict st, int64_t n, int64_t t, real scale,
                                    real *restrict m, real *restrict total)
{
    for (int64_t b = 0; b < n; b++) {
        real *s = st + b * t * t;
        for (int64_t i = 0; i < t; i++) {
            m[i] = s[i]; /* key 0 is visible to every query */
            total[i] = 0;
        }
        for (int64_t j = 1; j < t; j++)
            for (int64_t i = j; i < t; i++)
                m[i] = s[j * t + i] > m[i] ? s[j * t + i] : m[i];
        for (int64_t j = 0; j < t; j++) {
            real *row = s + j * t;
            for (int64_t i = 0; i < j; i++)
                row[i] = 0; /* the future: key j comes after query i */
            for (int64_t i = j; i < t; i++) {
                row[i] = EXP((row[i] - m[i]) * scale);
                total[i] += row[i];
            }
        }
        for (int64_t i = 0; i < t; i++)
            m[i] = 1 / total[i];
        for (int64_t j = 0; j < t; j++)
            for (int64_t i = j; i < t; i++)
                s[j * t + i] *= m[i];
    }
}

/* In place, per matrix: dst = dP^T -> dS^T = P^T * (dP^T - colsum(dP^T * P^T)) * scale.
 * scratch: t values. */
void KERNEL(softmax_backward_columns)(real *restrict dst, const real *restrict pt, int64_t n,
                                      int64_t t, real scale, real *restrict scratch)
{
    real *colsum = scratch;
    for (int64_t b = 0; b < n; b++) {
        real *d = dst + b * t * t;
        const real *p = pt + b * t * t;
        for (int64_t i = 0; i < t; i++)
            colsum[i] = 0;
        for (int64_t j = 0; j < t; j++)
            for (int64_t i = 0; i < t; i++)
                colsum[i] += d[j * t + i] * p[j * t + i];
        for (int64_t j = 0; j < t; j++)
            for (int64_t i = 0; i < t; i++)
                d[j * t + i] = p[j * t + i] * (d[j * t + i] - colsum[i]) * scale;
    }
}

/* ---- softmax cross-entropy over rows of v logits ---------------------------------------------- */

/* probs = softmax(logits) per row; losses[i] = log sum exp(logits_i) - logits_i[targets[i]]
 * (the row max subtracted first). logits, probs (n, v); targets, losses (n).
 * Returns -1, or the first row whose target is out of range (nothing is read out of bounds). */
int64_t KERNEL(cross_entropy_forward)(const real *restrict logits,
                                      const int64_t *restrict targets, int64_t n, int64_t v,
                                      real *restrict probs, real *restrict losses)
{
    for (int64_t i = 0; i < n; i++)
        if (wrap_index(targets[i], v) < 0)
            return i;
    for (int64_t i = 0; i < n; i++) { /* p = logits - row max */
        const real *row = logits + i * v;
        real m = row[0];
        for (int64_t j = 1; j < v; j++)
            m = row[j] > m ? row[j] : m;
        for (int64_t j = 0; j < v; j++)
            probs[i * v + j] = row[j] - m;
        losses[i] = -probs[i * v + wrap_index(targets[i], v)];
    }
    for (int64_t k = 0; k < n * v; k++) /* one flat loop: rows of 65 are too short for SIMD */
        probs[k] = EXP(probs[k]);
    for (int64_t i = 0; i < n; i++) {
        real *p = probs + i * v, total = 0;
        for (int64_t j = 0; j < v; j++)
            total += p[j];
        losses[i] += LOG(total);
        real inv = 1 / total;
        for (int64_t j = 0; j < v; j++)
            p[j] *= inv;
    }
    return -1;
}

/* In place on probs (n, v): dlogits = (probs - onehot(targets)) * scale, scale = dout / n.
 * Returns -1, or the first row whose target is out of range (then probs is untouched). */
int64_t KERNEL(cross_entropy_backward)(real *restrict probs, const int64_t *restrict targets,
                                       int64_t n, int64_t v, real scale)
{
    for (int64_t i = 0; i < n; i++)
        if (wrap_index(targets[i], v) < 0)
            return i;
    for (int64_t i = 0; i < n; i++)
        probs[i * v + wrap_index(targets[i], v)] -= 1;
    for (int64_t k = 0; k < n * v; k++) /* one flat loop: rows of 65 are too short for SIMD */
        probs[k] *= scale;
    return -1;
}

/* ---- the embedding backward ---------------------------------------------------------------- */

/* target[indices[k]] += rows[k] for k < n, repeated indices accumulating. target (v, c),
 * rows (n, c). Returns -1, or the first k whose index is out of range (target untouched). */
int64_t KERNEL(scatter_add_rows)(real *restrict target, int64_t v,
                                 const int64_t *restrict indices, const real *restrict rows,
                                 int64_t n, int64_t c)
{
    for (int64_t k = 0; k < n; k++)
        if (wrap_index(indices[k], v) < 0)
            return k;
    for (int64_t k = 0; k < n; k++) {
        real *restrict t = target + wrap_index(indices[k], v) * c;
        const real *restrict src = rows + k * c; /* (rows never overlap target) */
        for (int64_t j = 0; j < c; j++)
            t[j] += src[j];
    }
    return -1;
}

/* ---- AdamW, in place on p, m, v ----------------------------------------------------------------
 * m = b1 m + c1 g,  v = b2 v + c2 g*g,  p = p * decay - step_size * m / (sqrt(v * inv_bc2) + eps)
 * with c1 = 1 - b1, c2 = 1 - b2, decay = 1 - lr wd, step_size = lr / (1 - b1**t),
 * inv_bc2 = 1 / (1 - b2**t): the caller computes those once per step. */
void KERNEL(adamw_update)(real *restrict p, const real *restrict g, real *restrict m,
                          real *restrict v, int64_t n, real b1, real b2, real c1, real c2,
                          real decay, real step_size, real inv_bc2, real eps)
{
    for (int64_t i = 0; i < n; i++) {
        real mi = b1 * m[i] + c1 * g[i];
        real vi = b2 * v[i] + c2 * (g[i] * g[i]);
        m[i] = mi;
        v[i] = vi;
        p[i] = p[i] * decay - step_size * mi / (SQRT(vi * inv_bc2) + eps);
    }
}

/* ---- the gradients' sum and norm ---------------------------------------------------------------
 * The squares are summed in `real` over blocks of SQUARE_BLOCK values (vectorized: each SIMD
 * lane adds a few of them), and the blocks' sums in double: a float32 norm comes out as
 * accurate as one summed in double throughout (~1e-9 relative) at the speed of float32
 * arithmetic (converting every value to double made the loop 2x slower than NumPy's dot). */
#ifndef SQUARE_BLOCK
#define SQUARE_BLOCK 256
#endif

/* total += other over n values; returns the sum of the new total's squares. One pass where
 * adding and then measuring took two. */
static double KERNEL(add_square_sum_1)(real *restrict total, const real *restrict other, int64_t n)
{
    double squares = 0;
    for (int64_t start = 0; start < n; start += SQUARE_BLOCK) {
        int64_t end = n - start < SQUARE_BLOCK ? n : start + SQUARE_BLOCK;
        real block = 0;
        for (int64_t i = start; i < end; i++) {
            real t = total[i] + other[i];
            total[i] = t;
            block += t * t;
        }
        squares += block;
    }
    return squares;
}

/* The sum of a's n squares. */
static double KERNEL(square_sum_1)(const real *restrict a, int64_t n)
{
    double squares = 0;
    for (int64_t start = 0; start < n; start += SQUARE_BLOCK) {
        int64_t end = n - start < SQUARE_BLOCK ? n : start + SQUARE_BLOCK;
        real block = 0;
        for (int64_t i = start; i < end; i++)
            block += a[i] * a[i];
        squares += block;
    }
    return squares;
}

/* Whether n bytes from a and n bytes from b overlap (compared as integers: C leaves the
 * order of pointers into different arrays undefined). */
static inline int KERNEL(overlap)(const real *a, const real *b, int64_t n)
{
    uintptr_t x = (uintptr_t)a, y = (uintptr_t)b;
    return x < y + (uintptr_t)n && y < x + (uintptr_t)n;
}

/* For each of `count` arrays (a model's gradients) in turn: totals[k] += others[l * count + k]
 * for l < lists, over sizes[k] values, then the sum of its squares (lists 0: it is only
 * measured); returns the sum over all the arrays. One call for every array: a call from
 * Python costs microseconds, about what a pass over a small gradient does. Returns -1, and
 * writes nothing, where an array added into a total overlaps it (the caller then runs the
 * NumPy reference: these loops are restrict). */
double KERNEL(add_square_sum)(int64_t count, int64_t lists, real *const *totals,
                              const real *const *others, const int64_t *sizes)
{
    for (int64_t l = 0; l < lists; l++)
        for (int64_t k = 0; k < count; k++)
            if (KERNEL(overlap)(totals[k], others[l * count + k], sizes[k] * (int64_t)sizeof(real)))
                return -1;
    double squares = 0;
    for (int64_t k = 0; k < count; k++) {
        double mine = lists ? 0 : KERNEL(square_sum_1)(totals[k], sizes[k]);
        for (int64_t l = 0; l < lists; l++) /* (the squares after the last addition count) */
            mine = KERNEL(add_square_sum_1)(totals[k], others[l * count + k], sizes[k]);
        squares += mine;
    }
    return squares;
}

#endif

/* The C twins of tensorlite's hot non-matmul kernels (and of causal attention as a whole,
 * its small products included): plain serial loops, fused so that each pass reads its inputs
 * once and makes no temporaries.
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

/* The SIMD width the attention loops below are written for: one vector register of this CPU
 * (AVX-512, AVX/AVX2, else 16 bytes: SSE2, NEON). */
#if defined(__AVX512F__)
#define VECTOR_BYTES 64
#elif defined(__AVX__)
#define VECTOR_BYTES 32
#else
#define VECTOR_BYTES 16
#endif

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

#define COLS ((int64_t)(VECTOR_BYTES / sizeof(real))) /* values in one vector */

/* The column softmax of one t x t matrix of scores already scaled (as the reference scales
 * them before its max: so any scale, 0 or negative too, gives the reference's softmax), read
 * only from the block holding each row's first visible entry on (the whole attention below
 * does not write the blocks left of it): every row j is walked from the start of the COLS
 * block holding j, so the loops run whole vectors. The future entries inside that block are set to
 * -inf first (their exp is ~0 and the max ignores them), and every future entry is 0 at the
 * end. */
static void KERNEL(softmax_blocks)(real *restrict s, int64_t t, real *restrict m,
                                   real *restrict total)
{
    for (int64_t j = 0; j < t; j++)
        for (int64_t i = j / COLS * COLS; i < j; i++)
            s[j * t + i] = -INFINITY;
    for (int64_t i = 0; i < t; i++) {
        m[i] = s[i]; /* key 0 is visible to every query */
        total[i] = 0;
    }
    for (int64_t j = 1; j < t; j++)
        for (int64_t i = j / COLS * COLS; i < t; i++)
            m[i] = s[j * t + i] > m[i] ? s[j * t + i] : m[i];
    for (int64_t j = 0; j < t; j++) {
        real *row = s + j * t;
        for (int64_t i = j / COLS * COLS; i < t; i++) {
            row[i] = EXP(row[i] - m[i]);
            total[i] += row[i];
        }
    }
    for (int64_t i = 0; i < t; i++)
        m[i] = 1 / total[i];
    for (int64_t j = 0; j < t; j++) {
        real *row = s + j * t;
        for (int64_t i = j / COLS * COLS; i < t; i++)
            row[i] *= m[i];
        for (int64_t i = 0; i < j; i++)
            row[i] = 0;
    }
}

/* In place, per matrix: st -> P^T with P[i][j] = softmax over visible keys j of st[j][i] * scale
 * (scaled first, as the reference does, so that any scale works: exp((s - max s) * scale) would
 * overflow for a negative one). Entries of the future (i < j) become 0. m, total: t values of
 * scratch each (per query: the max over the visible keys, then the sum; two arrays, not halves
 * of one, so the compiler knows they are apart). */
void KERNEL(causal_softmax_columns)(real *restrict st, int64_t n, int64_t t, real scale,
                                    real *restrict m, real *restrict total)
{
    for (int64_t b = 0; b < n; b++) {
        real *s = st + b * t * t;
        for (int64_t j = 0; j < t; j++)
            for (int64_t i = j; i < t; i++)
                s[j * t + i] *= scale; /* the visible entries; softmax_blocks sets the rest */
        KERNEL(softmax_blocks)(s, t, m, total);
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

/* ---- causal attention, whole: products and softmax in one pass per (batch, head) -------------
 * The same math as functional.causal_self_attention_forward/backward (the spec), in loops that
 * skip the future: each product only computes the blocks of the t x t matrix that hold some
 * visible entry, about half of the work BLAS does on the full matrices. A vector `vec` holds
 * COLS values; a result tile is ROWS rows x COLS columns, kept in ROWS vector registers while
 * the shared dimension is summed. (GCC/clang vector types: `vec * x` multiplies every lane.)
 * The loops need t a multiple of COLS and ROWS, and hd a multiple of COLS:
 * attention_fits says; kernels_c.py runs the reference for other sizes. */

#define ROWS 8
typedef real KERNEL(vec) __attribute__((vector_size(VECTOR_BYTES)));
#define vec KERNEL(vec)

static inline vec KERNEL(load)(const real *p) /* any alignment */
{
    vec v;
    __builtin_memcpy(&v, p, sizeof v);
    return v;
}

static inline void KERNEL(store)(real *p, vec v) { __builtin_memcpy(p, &v, sizeof v); }

/* Does the C twin take these sizes? Not with 16-byte vectors at all: built for plain x86-64
 * (SSE2) it took 2.6x the reference's time at the baby size (on a Zen 4, against BLAS). */
int64_t KERNEL(attention_fits)(int64_t t, int64_t hd)
{
    return VECTOR_BYTES >= 32 && t > 0 && hd > 0 && t % COLS == 0 && t % ROWS == 0 &&
           hd % COLS == 0;
}

/* at (n x t) = a^T, a: t rows of n values, row stride lda. */
static void KERNEL(transpose)(const real *restrict a, int64_t lda, int64_t t, int64_t n,
                              real *restrict at)
{
    for (int64_t d = 0; d < n; d++)
        for (int64_t i = 0; i < t; i++)
            at[d * t + i] = a[i * lda + d];
}

/* c[j][i] = (a_j . bt[:, i]) * scale (a: t rows of n values, stride lda; bt: n x t), for the
 * column blocks i >= the block holding j: the blocks left of it are the future of every row in
 * the tile, and are not written. */
static void KERNEL(scores)(const real *restrict a, int64_t lda, const real *restrict bt, int64_t t,
                           int64_t n, real scale, real *restrict c)
{
    for (int64_t j0 = 0; j0 < t; j0 += ROWS)
        for (int64_t i0 = j0 / COLS * COLS; i0 < t; i0 += COLS) {
            vec acc[ROWS] = {0};
            for (int64_t d = 0; d < n; d++) {
                vec b = KERNEL(load)(bt + d * t + i0);
                for (int r = 0; r < ROWS; r++)
                    acc[r] += a[(j0 + r) * lda + d] * b;
            }
            for (int r = 0; r < ROWS; r++)
                KERNEL(store)(c + (j0 + r) * t + i0, acc[r] * scale);
        }
}

/* c_i = sum over j of a[j][i] b_j, for every row i of c (stride ldc): (a^T b) with a (t x t)
 * zero wherever j > i, so each tile of rows stops at its last visible j. b: t rows of n values,
 * stride ldb. */
static void KERNEL(by_columns)(const real *restrict a, int64_t t, const real *restrict b,
                               int64_t ldb, int64_t n, real *restrict c, int64_t ldc)
{
    for (int64_t i0 = 0; i0 < t; i0 += ROWS)
        for (int64_t d0 = 0; d0 < n; d0 += COLS) {
            vec acc[ROWS] = {0};
            for (int64_t j = 0; j < i0 + ROWS; j++) {
                vec bj = KERNEL(load)(b + j * ldb + d0);
                for (int r = 0; r < ROWS; r++)
                    acc[r] += a[j * t + i0 + r] * bj;
            }
            for (int r = 0; r < ROWS; r++)
                KERNEL(store)(c + (i0 + r) * ldc + d0, acc[r]);
        }
}

/* c_j = sum over i of a[j][i] b_i, for every row j of c: (a b) with a zero wherever i < j, so
 * each tile of rows starts at its first visible i. */
static void KERNEL(by_rows)(const real *restrict a, int64_t t, const real *restrict b, int64_t ldb,
                            int64_t n, real *restrict c, int64_t ldc)
{
    for (int64_t j0 = 0; j0 < t; j0 += ROWS)
        for (int64_t d0 = 0; d0 < n; d0 += COLS) {
            vec acc[ROWS] = {0};
            for (int64_t i = j0; i < t; i++) {
                vec bi = KERNEL(load)(b + i * ldb + d0);
                for (int r = 0; r < ROWS; r++)
                    acc[r] += a[(j0 + r) * t + i] * bi;
            }
            for (int r = 0; r < ROWS; r++)
                KERNEL(store)(c + (j0 + r) * ldc + d0, acc[r]);
        }
}

/* y (b, t, h*hd) and pt (b, h, t, t) from qkv (b, t, 3 h hd): per (batch, head), S^T = K Q^T
 * scale on the visible blocks, P^T by the column softmax, y = P V. Scratch: qt (hd x t), m, total (t). */
void KERNEL(causal_attention_forward)(const real *restrict qkv, int64_t nb, int64_t t,
                                      int64_t nh, int64_t hd, real scale, real *restrict y,
                                      real *restrict pt, real *restrict qt, real *restrict m,
                                      real *restrict total)
{
    int64_t c = nh * hd, ld = 3 * c;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++) {
            const real *q = qkv + b * t * ld + h * hd, *k = q + c, *v = q + 2 * c;
            real *p = pt + (b * nh + h) * t * t;
            KERNEL(transpose)(q, ld, t, hd, qt);
            KERNEL(scores)(k, ld, qt, t, hd, scale, p); /* S^T, scaled */
            KERNEL(softmax_blocks)(p, t, m, total); /* P^T */
            KERNEL(by_columns)(p, t, v, ld, hd, y + b * t * c + h * hd, c); /* P V */
        }
}

/* dqkv (b, t, 3 h hd) from dy (b, t, h hd), qkv and pt: per (batch, head)
 *   dV = P^T dout,  dP^T = V dout^T,  dS^T = P^T * (dP^T - colsum(dP^T * P^T)) * scale,
 *   dQ = dS K,  dK = dS^T Q.
 * Scratch: ds (t x t), dt (hd x t), colsum (t). */
void KERNEL(causal_attention_backward)(const real *restrict dy, const real *restrict qkv,
                                       const real *restrict pt, int64_t nb, int64_t t,
                                       int64_t nh, int64_t hd, real scale,
                                       real *restrict dqkv, real *restrict ds,
                                       real *restrict dt, real *restrict colsum)
{
    int64_t c = nh * hd, ld = 3 * c;
    for (int64_t b = 0; b < nb; b++)
        for (int64_t h = 0; h < nh; h++) {
            const real *q = qkv + b * t * ld + h * hd, *k = q + c, *v = q + 2 * c;
            const real *p = pt + (b * nh + h) * t * t, *dout = dy + b * t * c + h * hd;
            real *dq = dqkv + b * t * ld + h * hd, *dk = dq + c, *dv = dq + 2 * c;
            KERNEL(by_rows)(p, t, dout, c, hd, dv, ld); /* dV = P^T dout */
            KERNEL(transpose)(dout, c, t, hd, dt);
            KERNEL(scores)(v, ld, dt, t, hd, 1, ds); /* dP^T, visible blocks */
            for (int64_t i = 0; i < t; i++)
                colsum[i] = 0;
            for (int64_t j = 0; j < t; j++) /* P^T is 0 in the future: those add nothing */
                for (int64_t i = j / COLS * COLS; i < t; i++)
                    colsum[i] += ds[j * t + i] * p[j * t + i];
            for (int64_t j = 0; j < t; j++) {
                real *row = ds + j * t;
                for (int64_t i = 0; i < j / COLS * COLS; i++)
                    row[i] = 0; /* the blocks `scores` skipped */
                for (int64_t i = j / COLS * COLS; i < t; i++)
                    row[i] = p[j * t + i] * (row[i] - colsum[i]) * scale; /* dS^T */
            }
            KERNEL(by_columns)(ds, t, k, ld, hd, dq, ld); /* dQ = dS K */
            KERNEL(by_rows)(ds, t, q, ld, hd, dk, ld); /* dK = dS^T Q */
        }
}

#undef vec
#undef ROWS
#undef COLS

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

/* ---- a @ b^T by rows: the decoder's tied head ---------------------------------------------
 * y[r][j] = a_r . b_j for a (n x k) and b (m x k), both C-contiguous; row r of y has stride ldy.
 * Sampling's logits are x @ wte^T, a matrix-vector product that reads all of wte (V x C, 154 MB
 * at GPT-2 small's shape) for a handful of rows: memory-bound. Here b is read once, front to
 * back, each of its rows dotted with every row of a (which stays in cache), at about the
 * speed of a plain sum over memory; BLAS's transposed GEMV read it at about half that on a Zen 4
 * (docs/performance.md). Each y[r][j] is summed in one order, fixed by k alone: a row's result
 * does not depend on n, j or the other rows, nor on how b's rows are split over threads. (That
 * alone does not make a served sequence's logits the same alone or batched: gpt.model's Decoder
 * takes BLAS on more than ROW_DOTS_ROWS rows, and the other layers round by shape; see
 * gpt/batching.py.) */
#define COLS ((int64_t)(VECTOR_BYTES / sizeof(real)))
#define vec KERNEL(vec)
void KERNEL(row_dots)(const real *restrict a, int64_t n, int64_t k, const real *restrict b,
                      int64_t m, real *restrict y, int64_t ldy)
{
    const int64_t step = 8 * COLS; /* 8 vectors: 8 independent sums hide the FMA latency */
    for (int64_t j = 0; j < m; j++) {
        const real *bj = b + j * k;
        for (int64_t r = 0; r < n; r++) {
            const real *ar = a + r * k;
            vec s[8] = {0};
            int64_t i = 0;
            for (; i + step <= k; i += step)
                for (int u = 0; u < 8; u++)
                    s[u] += KERNEL(load)(ar + i + u * COLS) * KERNEL(load)(bj + i + u * COLS);
            for (; i + COLS <= k; i += COLS)
                s[0] += KERNEL(load)(ar + i) * KERNEL(load)(bj + i);
            vec t = ((s[0] + s[1]) + (s[2] + s[3])) + ((s[4] + s[5]) + (s[6] + s[7]));
            real lanes[COLS];
            __builtin_memcpy(lanes, &t, sizeof t);
            for (int64_t w = COLS / 2; w >= 1; w /= 2) /* pairwise, in a fixed order */
                for (int64_t l = 0; l < w; l++)
                    lanes[l] += lanes[l + w];
            real total = lanes[0];
            for (; i < k; i++)
                total += ar[i] * bj[i];
            y[r * ldy + j] = total;
        }
    }
}

/* ---- one decoder step for a batch of sequences: gpt.serve's batched decoding -------------------
 * The twin of references.decode_step (the spec): every block of a GPT for one new token of each
 * of S sequences, in place on their residual rows x (S x C), the keys and values into each
 * sequence's own cache. One call runs the whole stack, so the GIL is free for all of it: a
 * server's event loop writes to its clients on the other core meanwhile. At a small model's size
 * BLAS spends most of a few-row product's time on the call and on packing (8 rows x 128 @ 128 x 384:
 * ~40 GFLOP/s on a Zen 3, where its big products reach ~90); here a product's rows stay in
 * registers, up to 8 at a time, while the weights stream past them once.
 *
 * weights: 12 pointers per block, in references.decode_step's order (NULL for a missing bias),
 * each linear layer's weight w (k x n) packed in panels of COLS columns: panel q holds
 * w[p][q * COLS + l] at (q * k + p) * COLS + l, so a tile of columns reads its weights front to
 * back, whole cache lines (read by columns of the stored layout, a 6-layer n_embd 384 model's
 * step took 3x as long, its weights coming from memory a half cache line at a time);
 * k, v: (slots, H, tc, hd) per block, block after block; work: S * 9 C + tc values of scratch.
 * C must be a multiple of COLS: decode_fits says (and decode_panel gives COLS). */

/* A tile of y: `rows` rows x `nv` vectors of columns from column j (rows * nv <= 8: eight
 * independent sums hide the FMA's latency; one row alone takes 8 vectors), x's rows times
 * w (k x n, packed in panels: see decode_step) (+ bias), or added into y. Inlined with rows and
 * nv constants, so the sums stay in registers while the panels stream past them once, front to
 * back. */
static inline __attribute__((always_inline)) void KERNEL(tile)(
    const real *restrict x, int64_t k, const real *restrict w, const real *restrict bias,
    int64_t n, int64_t j, real *restrict y, int add, const int rows, const int nv)
{
    vec acc[8] = {0};
    const real *panel = w + j * k; /* panels j / COLS, j / COLS + 1, ...: k x COLS each */
    for (int64_t p = 0; p < k; p++)
        for (int h = 0; h < nv; h++) {
            vec wp = KERNEL(load)(panel + (h * k + p) * COLS);
            for (int r = 0; r < rows; r++)
                acc[r * nv + h] += x[r * k + p] * wp;
        }
    for (int r = 0; r < rows; r++)
        for (int h = 0; h < nv; h++) {
            real *out = y + r * n + j + h * COLS;
            vec sum = acc[r * nv + h];
            if (bias)
                sum += KERNEL(load)(bias + j + h * COLS);
            KERNEL(store)(out, add ? KERNEL(load)(out) + sum : sum);
        }
}

/* `rows` rows of y: tiles of 8 / rows vectors across, then single vectors for the rest. */
static inline __attribute__((always_inline)) void KERNEL(tile_rows)(
    const real *restrict x, int64_t k, const real *restrict w, const real *restrict bias,
    int64_t n, real *restrict y, int add, const int rows)
{
    const int nv = 8 / rows;
    int64_t j = 0;
    for (; j + nv * COLS <= n; j += nv * COLS)
        KERNEL(tile)(x, k, w, bias, n, j, y, add, rows, nv);
    for (; j < n; j += COLS)
        KERNEL(tile)(x, k, w, bias, n, j, y, add, rows, 1);
}

/* y (m x n) = x (m x k) @ w (k x n, in panels) + bias (bias may be NULL), or with `add`, y +=
 * that: 8 rows at a time, then 4, 2 and 1 for the rest. n is a multiple of COLS. */
static void KERNEL(rows_times)(const real *restrict x, int64_t m, int64_t k,
                               const real *restrict w, const real *restrict bias, int64_t n,
                               real *restrict y, int add)
{
    int64_t i = 0;
    for (; i + 8 <= m; i += 8)
        KERNEL(tile_rows)(x + i * k, k, w, bias, n, y + i * n, add, 8);
    if (m - i >= 4) {
        KERNEL(tile_rows)(x + i * k, k, w, bias, n, y + i * n, add, 4);
        i += 4;
    }
    if (m - i >= 2) {
        KERNEL(tile_rows)(x + i * k, k, w, bias, n, y + i * n, add, 2);
        i += 2;
    }
    if (m - i >= 1)
        KERNEL(tile_rows)(x + i * k, k, w, bias, n, y + i * n, add, 1);
}

/* y = norm(x) per row of c: rms_norm (b NULL) or layer_norm, as the references compute them. */
static void KERNEL(norm_rows)(const real *restrict x, int64_t m, int64_t c, const real *restrict w,
                              const real *restrict b, int layernorm, real eps, real *restrict y)
{
    for (int64_t i = 0; i < m; i++) {
        const real *xi = x + i * c;
        real *yi = y + i * c;
        real mean = 0, ss = 0;
        if (layernorm) {
            for (int64_t j = 0; j < c; j++)
                mean += xi[j];
            mean /= c;
        }
        for (int64_t j = 0; j < c; j++)
            ss += (xi[j] - mean) * (xi[j] - mean);
        real r = 1 / SQRT(ss / c + eps);
        for (int64_t j = 0; j < c; j++)
            yi[j] = (xi[j] - mean) * r * w[j] + (layernorm ? b[j] : 0);
    }
}

/* One head of one row: its new key and value (at q + c and q + 2c) into its cache ks, vs
 * (tc x hd each) at position `put`, then y (hd) = softmax(q . keys 0..pos * scale) @ values. */
static inline void KERNEL(attend)(const real *restrict q, int64_t c, real *restrict ks,
                                  real *restrict vs, int64_t hd, int64_t put, int64_t pos,
                                  real scale, real *restrict att, real *restrict y)
{
    for (int64_t d = 0; d < hd; d++) {
        ks[put * hd + d] = q[c + d];
        vs[put * hd + d] = q[2 * c + d];
    }
    const int64_t t1 = pos + 1;
    real top = -INFINITY, total = 0;
    if (hd % COLS == 0) { /* the dot products a vector at a time */
        for (int64_t t = 0; t < t1; t++) {
            vec dot = {0};
            for (int64_t d = 0; d < hd; d += COLS)
                dot += KERNEL(load)(q + d) * KERNEL(load)(ks + t * hd + d);
            real lanes[COLS], sum = 0;
            __builtin_memcpy(lanes, &dot, sizeof dot);
            for (int64_t l = 0; l < COLS; l++)
                sum += lanes[l];
            att[t] = sum * scale;
        }
    } else {
        for (int64_t t = 0; t < t1; t++) {
            real dot = 0;
            for (int64_t d = 0; d < hd; d++)
                dot += q[d] * ks[t * hd + d];
            att[t] = dot * scale;
        }
    }
    for (int64_t t = 0; t < t1; t++)
        top = att[t] > top ? att[t] : top;
    for (int64_t t = 0; t < t1; t++) {
        att[t] = EXP(att[t] - top);
        total += att[t];
    }
    const real inv = 1 / total;
    if (hd % COLS == 0) {
        for (int64_t d = 0; d < hd; d += COLS) {
            vec out = {0};
            for (int64_t t = 0; t < t1; t++)
                out += att[t] * KERNEL(load)(vs + t * hd + d);
            KERNEL(store)(y + d, out * inv);
        }
    } else {
        for (int64_t d = 0; d < hd; d++)
            y[d] = 0;
        for (int64_t t = 0; t < t1; t++)
            for (int64_t d = 0; d < hd; d++)
                y[d] += att[t] * vs[t * hd + d];
        for (int64_t d = 0; d < hd; d++)
            y[d] *= inv;
    }
}

int64_t KERNEL(decode_fits)(int64_t c) { return VECTOR_BYTES >= 32 && c > 0 && c % COLS == 0; }
int64_t KERNEL(decode_panel)(void) { return COLS; }

void KERNEL(decode_step)(real *restrict x, int64_t s, int64_t c, int64_t nh, int64_t nl,
                         const int64_t *restrict put, const int64_t *restrict pos,
                         const real *const *restrict weights, real *restrict kc,
                         real *restrict vc, int64_t slots, int64_t tc, int64_t layernorm,
                         int64_t gelu, real eps, real scale, real *restrict work)
{
    const int64_t hd = c / nh, per_block = slots * nh * tc * hd;
    real *xn = work, *qkv = xn + s * c, *y = qkv + s * 3 * c, *h = y + s * c, *att = h + s * 4 * c;
    for (int64_t l = 0; l < nl; l++) {
        const real *const *wl = weights + 12 * l;
        real *kl = kc + l * per_block, *vl = vc + l * per_block;
        /* x += attention(norm(x, ln_1)) */
        KERNEL(norm_rows)(x, s, c, wl[0], wl[1], (int)layernorm, eps, xn);
        KERNEL(rows_times)(xn, s, c, wl[2], wl[3], 3 * c, qkv, 0);
        for (int64_t i = 0; i < s; i++)
            for (int64_t hh = 0; hh < nh; hh++)
                KERNEL(attend)(qkv + i * 3 * c + hh * hd, c, kl + (i * nh + hh) * tc * hd,
                               vl + (i * nh + hh) * tc * hd, hd, put[i], pos[i], scale, att,
                               y + i * c + hh * hd);
        KERNEL(rows_times)(y, s, c, wl[4], wl[5], c, x, 1);
        /* x += mlp(norm(x, ln_2)) */
        KERNEL(norm_rows)(x, s, c, wl[6], wl[7], (int)layernorm, eps, xn);
        KERNEL(rows_times)(xn, s, c, wl[8], wl[9], 4 * c, h, 0);
        for (int64_t j = 0; j < s * 4 * c; j++) {
            real u = h[j];
            if (gelu) { /* x/2 (1 + tanh(k (x + a x**3))), tanh(z) = 1 - 2 / (exp(2z) + 1) */
                real z = (real)0.7978845608028654 * (u + (real)0.044715 * u * u * u);
                h[j] = u * (real)0.5 * (2 - 2 / (EXP(2 * z) + 1));
            } else { /* a NaN fails `<= 0` and stays NaN, as in np.maximum */
                h[j] = u <= 0 ? 0 : u * u;
            }
        }
        KERNEL(rows_times)(h, s, 4 * c, wl[10], wl[11], c, x, 1);
    }
}
#undef vec
#undef COLS

#endif

#ifndef real /* ---- once more in the first pass (after both types): the bfloat16 GEMM ------- */
/* C = bf16(A) @ bf16(B) with float32 accumulation: the twin of tensorlite.bf16's NumPy
 * reference (matmul_bf16_reference is the spec). bf16 is float32's upper 16 bits: the same
 * sign and 8-bit exponent, 7 mantissa bits. Operands are rounded to nearest even on the way
 * into the packed buffers (to_bf16 below, bit for bit the reference's rounding); the product
 * is AVX512_BF16's vdpbf16ps: in each of 16 float32 lanes, acc += a[2i] b[2i] + a[2i+1] b[2i+1]
 * (twice the float32 FMA's multiplies per instruction). Like every kernel here it is serial:
 * tensorlite.bf16 splits the rows of A over its threads, after packing B once.
 *
 * Layouts (caller-allocated, as everywhere in this file):
 *   B packed  for each panel of NR = 32 columns, for each pair of rows (2p, 2p+1) of B:
 *             32 (b[2p][j], b[2p+1][j]) pairs, j the panel's columns: one 64-byte vector per
 *             16 columns; columns past n and a row past k are zero.
 *   A packed  all rows of A (padded to whole tiles), each row's KC values as bf16 (k padded to even with 0).
 * A tile of MR = 12 rows x NR = 32 columns lives in 24 of the 32 zmm registers. */
#if defined(__AVX512BF16__) && defined(__AVX512F__)
#include <immintrin.h>
#include <string.h>

#define BF16_MR 12
#define BF16_NR 32
#define BF16_KC 256 /* a 12 x 256 slice of A and a 256 x 32 panel of B sit in L1 */

int64_t bf16_gemm_available(void) { return 1; }

/* float32 -> bfloat16, round to nearest even; a NaN stays a (quiet) NaN. */
static inline uint16_t to_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, 4);
    if ((u & 0x7FFFFFFFu) > 0x7F800000u) return (uint16_t)((u | 0x00400000u) >> 16);
    return (uint16_t)((u + 0x7FFFu + ((u >> 16) & 1u)) >> 16);
}

/* Sizes (in uint16 values) of the scratch buffers: packed B for a (k, n) B, packed A. */
int64_t bf16_packed_b_size(int64_t k, int64_t n)
{
    return (n + BF16_NR - 1) / BF16_NR * ((k + 1) / 2) * 2 * BF16_NR;
}

int64_t bf16_packed_a_size(int64_t m) { return (m + BF16_MR - 1) / BF16_MR * BF16_MR * BF16_KC; }

/* Pack B (k x n; b[p][j] at b[p * s0 + j * s1]) into bp, rounding to bf16. */
void bf16_pack_b(const float *restrict b, int64_t s0, int64_t s1, int64_t k, int64_t n,
                 uint16_t *restrict bp)
{
    int64_t pairs = (k + 1) / 2;
    for (int64_t j0 = 0; j0 < n; j0 += BF16_NR) {
        uint16_t *panel = bp + j0 / BF16_NR * pairs * 2 * BF16_NR;
        int64_t cols = n - j0 < BF16_NR ? n - j0 : BF16_NR;
        if (s0 == 1 && cols == BF16_NR) { /* B = W^T (a backward's): read each column in order */
            for (int64_t j = 0; j < BF16_NR; j++) {
                const float *col = b + (j0 + j) * s1;
                for (int64_t p = 0; p < pairs; p++) {
                    panel[p * 2 * BF16_NR + 2 * j] = to_bf16(col[2 * p]);
                    panel[p * 2 * BF16_NR + 2 * j + 1] = 2 * p + 1 < k ? to_bf16(col[2 * p + 1]) : 0;
                }
            }
            continue;
        }
        for (int64_t p = 0; p < pairs; p++) {
            uint16_t *out = panel + p * 2 * BF16_NR;
            const float *r0 = b + 2 * p * s0 + j0 * s1, *r1 = r0 + s0;
            int second = 2 * p + 1 < k;
            if (s1 == 1 && cols == BF16_NR) {
                for (int64_t j = 0; j < BF16_NR; j++) {
                    out[2 * j] = to_bf16(r0[j]);
                    out[2 * j + 1] = second ? to_bf16(r1[j]) : 0;
                }
                continue;
            }
            for (int64_t j = 0; j < BF16_NR; j++) {
                out[2 * j] = j < cols ? to_bf16(r0[j * s1]) : 0;
                out[2 * j + 1] = j < cols && second ? to_bf16(r1[j * s1]) : 0;
            }
        }
    }
}

/* Rows [i0, i0 + mc) and columns [p0, p0 + kc) of A into ap, a row every `lda` values (lda
 * even, >= kc): rounded to bf16, padded with zeros to lda and to a whole number of tiles. */
static void bf16_pack_a(const float *restrict a, int64_t s0, int64_t s1, int64_t i0,
                        int64_t mc, int64_t p0, int64_t kc, int64_t lda, uint16_t *restrict ap)
{
    int64_t rows = (mc + BF16_MR - 1) / BF16_MR * BF16_MR;
    for (int64_t i = 0; i < rows; i++) {
        uint16_t *out = ap + i * lda;
        if (i >= mc) {
            memset(out, 0, (size_t)lda * 2);
            continue;
        }
        const float *row = a + (i0 + i) * s0 + p0 * s1;
        if (s1 == 1)
            for (int64_t p = 0; p < kc; p++) out[p] = to_bf16(row[p]);
        else
            for (int64_t p = 0; p < kc; p++) out[p] = to_bf16(row[p * s1]);
        for (int64_t p = kc; p < lda; p++) out[p] = 0;
    }
}

/* One MR x NR tile of C: `pairs` pairs of A's columns (rows at a + i * lda) times the panel
 * bp; stored into the rows x cols corner at c, or added to it unless `first`. */
static inline void bf16_tile(int64_t pairs, const uint16_t *restrict a, int64_t lda,
                             const uint16_t *restrict bp, float *restrict c, int64_t ldc,
                             int first, int64_t rows, int64_t cols)
{
    __m512 acc[BF16_MR][2];
    for (int i = 0; i < BF16_MR; i++) acc[i][0] = acc[i][1] = _mm512_setzero_ps();
    for (int64_t p = 0; p < pairs; p++) {
        __m512bh b0 = (__m512bh)_mm512_loadu_si512(bp + p * 2 * BF16_NR);
        __m512bh b1 = (__m512bh)_mm512_loadu_si512(bp + p * 2 * BF16_NR + BF16_NR);
        for (int i = 0; i < BF16_MR; i++) {
            int32_t pair;
            memcpy(&pair, a + i * lda + 2 * p, 4);
            __m512bh ai = (__m512bh)_mm512_set1_epi32(pair);
            acc[i][0] = _mm512_dpbf16_ps(acc[i][0], ai, b0);
            acc[i][1] = _mm512_dpbf16_ps(acc[i][1], ai, b1);
        }
    }
    if (rows == BF16_MR && cols == BF16_NR) {
        for (int i = 0; i < BF16_MR; i++) {
            float *ci = c + i * ldc;
            if (!first) {
                acc[i][0] = _mm512_add_ps(acc[i][0], _mm512_loadu_ps(ci));
                acc[i][1] = _mm512_add_ps(acc[i][1], _mm512_loadu_ps(ci + 16));
            }
            _mm512_storeu_ps(ci, acc[i][0]);
            _mm512_storeu_ps(ci + 16, acc[i][1]);
        }
        return;
    }
    float tile[BF16_MR][BF16_NR];
    for (int i = 0; i < BF16_MR; i++) {
        _mm512_storeu_ps(tile[i], acc[i][0]);
        _mm512_storeu_ps(tile[i] + 16, acc[i][1]);
    }
    for (int64_t i = 0; i < rows; i++)
        for (int64_t j = 0; j < cols; j++)
            c[i * ldc + j] = first ? tile[i][j] : c[i * ldc + j] + tile[i][j];
}

/* C (m x n, row stride ldc) = bf16(A) @ B for A (m x k; a[i][p] at a[i * s0 + p * s1]) and
 * B packed by bf16_pack_b; ap is scratch of bf16_packed_a_size(m) values.
 * Per block of KC of the shared dimension: all m rows of A are packed (m x 512 bytes, in L2),
 * then each 32-column panel of B (16 KiB) stays in L1 while every tile of rows passes over it.
 * (Walking the rows in blocks with every panel inside re-read B from L3 once B's block outgrew
 * L2: 130 GFLOP/s instead of 170 at n = 3072.) Each tile of C sums the blocks in order, so the
 * loop order does not change a bit of the result. */
void bf16_gemm_packed(const float *restrict a, int64_t s0, int64_t s1,
                      const uint16_t *restrict bp, float *restrict c, int64_t ldc,
                      int64_t m, int64_t n, int64_t k, uint16_t *restrict ap)
{
    int64_t pairs = (k + 1) / 2;
    if (k == 0) {
        for (int64_t i = 0; i < m; i++)
            for (int64_t j = 0; j < n; j++) c[i * ldc + j] = 0;
        return;
    }
    for (int64_t p0 = 0; p0 < k; p0 += BF16_KC) {
        int64_t kc = k - p0 < BF16_KC ? k - p0 : BF16_KC;
        int64_t lda = (kc + 1) / 2 * 2;
        bf16_pack_a(a, s0, s1, 0, m, p0, kc, lda, ap);
        for (int64_t j0 = 0; j0 < n; j0 += BF16_NR) {
            const uint16_t *panel = bp + (j0 / BF16_NR * pairs + p0 / 2) * 2 * BF16_NR;
            int64_t cols = n - j0 < BF16_NR ? n - j0 : BF16_NR;
            for (int64_t i = 0; i < m; i += BF16_MR)
                bf16_tile(lda / 2, ap + i * lda, lda, panel, c + i * ldc + j0, ldc, p0 == 0,
                          m - i < BF16_MR ? m - i : BF16_MR, cols);
        }
    }
}
#else /* no AVX512_BF16 here: tensorlite.bf16 runs the float32 fallback instead */
int64_t bf16_gemm_available(void) { return 0; }
#endif
#endif

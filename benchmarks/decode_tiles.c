/* How tensorlite's decode_step multiplies a few rows by a GPT's weights (docs/performance.md,
 * "Decoding many sequences at once"): the products of one batched step, 8 rows through every
 * linear layer of L blocks of width C, timed two ways:
 *   - a tile of R rows x V vectors of columns kept in registers, the weights read in their
 *     stored (in, out) layout (a tile takes V vectors of each weight row), for R x V in
 *     8 x 1, 4 x 2, 2 x 4, 8 x 2;
 *   - 8 x 1 with the weights packed in panels of one vector's width (what the kernel does).
 * Plain C, no Python: the loops alone. Build and run (the flags are tensorlite's):
 *
 *   cc -O3 -march=native -ffp-contract=fast -fassociative-math -fno-signed-zeros \
 *      -fno-trapping-math benchmarks/decode_tiles.c -o /tmp/decode_tiles
 *   /tmp/decode_tiles 128 4      # the baby's blocks (3.1 MB of weights)
 *   /tmp/decode_tiles 384 6      # the 6-layer/384 shape's (42.5 MB: from memory)
 *
 * Prints the best of 10 rounds (each the mean of 5 passes over all the blocks). */
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#if defined(__AVX512F__)
#define COLS 16
#elif defined(__AVX__)
#define COLS 8
#else
#define COLS 4
#endif
typedef float vec __attribute__((vector_size(COLS * sizeof(float))));

static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }

/* y (8 x n) = x (8 x k) @ w (k x n), stored layout, tiles of R rows x V vectors */
static inline __attribute__((always_inline)) void stored(const float *restrict x, int64_t k,
                                                         const float *restrict w, int64_t n,
                                                         float *restrict y, const int R, const int V)
{
    for (int64_t i0 = 0; i0 < 8; i0 += R)
        for (int64_t j = 0; j < n; j += V * COLS) {
            vec acc[R * V];
            for (int a = 0; a < R * V; a++)
                acc[a] = (vec){0};
            for (int64_t p = 0; p < k; p++)
                for (int h = 0; h < V; h++) {
                    vec wp = load(w + p * n + j + h * COLS);
                    for (int r = 0; r < R; r++)
                        acc[r * V + h] += x[(i0 + r) * k + p] * wp;
                }
            for (int r = 0; r < R; r++)
                for (int h = 0; h < V; h++)
                    store(y + (i0 + r) * n + j + h * COLS, acc[r * V + h]);
        }
}

/* the same, 8 x 1 tiles, w packed: panel q holds columns q*COLS .. of every row in turn */
static void packed(const float *restrict x, int64_t k, const float *restrict w, int64_t n,
                   float *restrict y)
{
    for (int64_t j = 0; j < n; j += COLS) {
        vec acc[8] = {0};
        const float *panel = w + j * k;
        for (int64_t p = 0; p < k; p++) {
            vec wp = load(panel + p * COLS);
            for (int r = 0; r < 8; r++)
                acc[r] += x[r * k + p] * wp;
        }
        for (int r = 0; r < 8; r++)
            store(y + r * n + j, acc[r]);
    }
}

static double now(void)
{
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return t.tv_sec + t.tv_nsec * 1e-9;
}

int main(int argc, char **argv)
{
    const int64_t C = argc > 1 ? atoi(argv[1]) : 128;
    const int L = argc > 2 ? atoi(argv[2]) : 4;
    if (C <= 0 || C % COLS || L <= 0 || L > 64) {
        fprintf(stderr, "usage: %s C L  (C a multiple of %d, 1 <= L <= 64)\n", argv[0], COLS);
        return 2;
    }
    const int64_t shapes[4][2] = {{C, 3 * C}, {C, C}, {C, 4 * C}, {4 * C, C}};
    float **w = malloc(sizeof(float *) * 4 * L), **pw = malloc(sizeof(float *) * 4 * L);
    float *x = malloc(sizeof(float) * 8 * 4 * C), *y = malloc(sizeof(float) * 8 * 4 * C);
    for (int64_t i = 0; i < 8 * 4 * C; i++)
        x[i] = 0.01f * (i % 7);
    for (int b = 0; b < 4 * L; b++) {
        const int64_t k = shapes[b % 4][0], n = shapes[b % 4][1];
        w[b] = malloc(sizeof(float) * k * n);
        pw[b] = malloc(sizeof(float) * k * n);
        for (int64_t i = 0; i < k * n; i++)
            w[b][i] = 0.001f * (i % 13);
        for (int64_t j = 0; j < n; j += COLS)
            for (int64_t p = 0; p < k; p++)
                memcpy(pw[b] + j * k + p * COLS, w[b] + p * n + j, sizeof(float) * COLS);
    }
    const char *names[] = {"stored 8 x 1", "stored 4 x 2", "stored 2 x 4", "stored 8 x 2",
                           "packed 8 x 1"};
    const double flop = 2.0 * 8 * L * 12 * C * C;
    printf("8 rows through %d blocks of width %ld (%.1f MB of weights), vectors of %d floats\n",
           L, (long)C, L * 12.0 * C * C * 4 / 1e6, COLS);
    for (int way = 0; way < 5; way++) {
        double best = 1e30;
        for (int round = 0; round < 10; round++) {
            double t = now();
            for (int pass = 0; pass < 5; pass++)
                for (int b = 0; b < 4 * L; b++) {
                    const int64_t k = shapes[b % 4][0], n = shapes[b % 4][1];
                    if (way == 0) stored(x, k, w[b], n, y, 8, 1);
                    if (way == 1) stored(x, k, w[b], n, y, 4, 2);
                    if (way == 2) stored(x, k, w[b], n, y, 2, 4);
                    if (way == 3) stored(x, k, w[b], n, y, 8, 2);
                    if (way == 4) packed(x, k, pw[b], n, y);
                }
            t = (now() - t) / 5;
            best = t < best ? t : best;
        }
        printf("  %-13s %8.1f us  %5.1f GFLOP/s\n", names[way], best * 1e6, flop / best / 1e9);
    }
    return 0;
}

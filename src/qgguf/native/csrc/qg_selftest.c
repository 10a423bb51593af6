/* Stand-alone self-test of the kernels (not part of the Python module): every available ISA
 * path against a float64 reference for a few AQ configurations.  Used to test the NEON path
 * under qemu-aarch64 (tests/test_native_aq.py):
 *   aarch64-linux-gnu-gcc -O2 -std=gnu11 -ffp-contract=off -static -Icsrc csrc/qg_selftest.c \
 *       csrc/qg_core.c csrc/qg_aq_*.c -lpthread -lm && qemu-aarch64 ./a.out
 * Prints "<isa> ok" per path and exits with 1 on the first mismatch. */
#include "qg_native.h"
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

static uint64_t rng = 88172645463325252ull;
static uint64_t next(void) { rng ^= rng << 13; rng ^= rng >> 7; rng ^= rng << 17; return rng; }
static float frand(void) { return (float)((next() >> 11) * (1.0 / 9007199254740992.0)) * 2.f - 1.f; }

static int run(int isa, int M, int B, int g, int64_t R, int64_t C) {
    const int64_t J = C / g, K = (int64_t)1 << B, N = 7;
    void *codes = malloc((size_t)(J * M * R) * (B == 8 ? 1 : 2));
    float *cb = malloc(sizeof(float) * M * K * g), *cbT = malloc(sizeof(float) * M * K * g);
    float *s = malloc(sizeof(float) * R), *x = malloc(sizeof(float) * C * N);
    float *W = malloc(sizeof(float) * R * C), *Wr = malloc(sizeof(float) * R * C);
    float *y = malloc(sizeof(float) * R * N);
    for (int64_t i = 0; i < J * M * R; i++) {
        if (B == 8) ((uint8_t *)codes)[i] = (uint8_t)next();
        else ((uint16_t *)codes)[i] = (uint16_t)next();
    }
    for (int64_t i = 0; i < M * K * g; i++) cb[i] = frand() * 0.05f;
    for (int64_t m = 0; m < M; m++)
        for (int64_t k = 0; k < K; k++)
            for (int64_t d = 0; d < g; d++) cbT[(m * g + d) * K + k] = cb[(m * K + k) * g + d];
    for (int64_t r = 0; r < R; r++) s[r] = 0.5f + 0.5f * (frand() + 1.f);
    for (int64_t i = 0; i < C * N; i++) x[i] = frand();
    qg_tensor t = {QG_TYPE_AQ, M, B, g, R, C, codes, cb, B == 8 ? cbT : NULL, s, NULL, NULL, NULL, {0}};
    /* reference dequantization, in the defined order */
    for (int64_t r = 0; r < R; r++)
        for (int64_t j = 0; j < J; j++)
            for (int64_t d = 0; d < g; d++) {
                float acc = 0.f;
                for (int64_t m = 0; m < M; m++) {
                    int64_t ci = (j * M + m) * R + r;
                    int64_t k = B == 8 ? ((uint8_t *)codes)[ci] : ((uint16_t *)codes)[ci];
                    acc = m == 0 ? cb[(m * K + k) * g + d] : acc + cb[(m * K + k) * g + d];
                }
                Wr[r * C + j * g + d] = acc * s[r];
            }
    int bad = 0;
    if (qg_set_isa(isa) != 0) return 1;
    for (int th = 1; th <= 2 && !bad; th++) {
        qg_dequantize_rows(&t, 0, R, W, th);
        if (memcmp(W, Wr, sizeof(float) * R * C)) { printf("dequantize mismatch\n"); bad = 1; }
        for (int64_t n = 1; n <= N && !bad; n += N - 1) {
            if (n == 1) qg_matvec(&t, x, y, th);
            else qg_matmul(&t, x, n, y, th);
            double num = 0, den = 0;
            for (int64_t i = 0; i < n; i++)
                for (int64_t r = 0; r < R; r++) {
                    double ref = 0;
                    for (int64_t c = 0; c < C; c++) ref += (double)Wr[r * C + c] * x[i * C + c];
                    num += (y[i * R + r] - ref) * (y[i * R + r] - ref);
                    den += ref * ref;
                }
            if (!(sqrt(num / den) < 2e-4)) { printf("matmul n=%ld error %g\n", (long)n, sqrt(num / den)); bad = 1; }
        }
    }
    if (bad) printf("FAIL %s %dx%d-g%d R=%ld C=%ld\n", qg_isa_name(isa), M, B, g, (long)R, (long)C);
    free(codes); free(cb); free(cbT); free(s); free(x); free(W); free(Wr); free(y);
    return bad;
}

int main(void) {
    static const int cfg[][3] = {{1, 16, 8}, {2, 8, 8}, {1, 8, 8}, {4, 8, 8}, {2, 8, 16}};
    static const int64_t shp[][2] = {{100, 80}, {264, 272}};
    for (int isa = 0; isa < QG_ISA_COUNT; isa++) {
        if (!qg_isa_available(isa)) continue;
        for (size_t i = 0; i < sizeof cfg / sizeof cfg[0]; i++)
            for (size_t k = 0; k < sizeof shp / sizeof shp[0]; k++)
                if (run(isa, cfg[i][0], cfg[i][1], cfg[i][2], shp[k][0], shp[k][1])) return 1;
        printf("%s ok\n", qg_isa_name(isa));
    }
    return 0;
}

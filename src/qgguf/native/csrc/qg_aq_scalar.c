/* Portable scalar kernels (reference path, tails, and fallback on every CPU). */
#include "qg_native.h"
#include <string.h>

static inline uint32_t code_at(const qg_tensor *t, int64_t idx) {
    return t->B == 8 ? ((const uint8_t *)t->codes)[idx] : ((const uint16_t *)t->codes)[idx];
}

void qg_aq_dequantize_rows_scalar(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t R = t->R, C = t->C, g = t->g, M = t->M, J = C / g;
    const int64_t K = (int64_t)1 << t->B;
    for (int64_t rb = r0; rb < r1; rb += 64) {
        const int64_t re = rb + 64 < r1 ? rb + 64 : r1;
        for (int64_t r = rb; r < re; r++) {
            for (int64_t j = 0; j < J; j++) {
                float *o = out + (r - r0) * C + j * g;
                const float s = t->scales[r];
                const float *e0 = t->codebooks + code_at(t, (j * M) * R + r) * g;
                for (int64_t d = 0; d < g; d++) o[d] = e0[d];
                for (int64_t m = 1; m < M; m++) {
                    const float *e = t->codebooks + (m * K + code_at(t, (j * M + m) * R + r)) * g;
                    for (int64_t d = 0; d < g; d++) o[d] += e[d];
                }
                for (int64_t d = 0; d < g; d++) o[d] *= s;
            }
        }
    }
}

int64_t qg_aq_prep_size(const qg_tensor *t) {
    if (t->B != 8) return 0;
    return (t->C / t->g) * t->M * 256;
}

/* LUT[j][m][k] = dot(codebook[m][k], x[j*g:(j+1)*g]) */
void qg_aq_prepare_scalar(const qg_tensor *t, const float *x, float *lut, int64_t j0, int64_t j1) {
    const int64_t g = t->g, M = t->M;
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * g;
        for (int64_t m = 0; m < M; m++) {
            float *l = lut + (j * M + m) * 256;
            const float *cb = t->codebooks + m * 256 * g;
            for (int k = 0; k < 256; k++) {
                float acc = 0.f;
                for (int64_t d = 0; d < g; d++) acc += cb[k * g + d] * xj[d];
                l[k] = acc;
            }
        }
    }
}

void qg_aq_vec_rows_scalar(const qg_tensor *t, const float *x, const float *lut, float *y,
                           int64_t r0, int64_t r1) {
    const int64_t R = t->R, g = t->g, M = t->M, J = t->C / g;
    float acc[64];
    if (t->B == 8) {
        const uint8_t *codes = (const uint8_t *)t->codes;
        for (int64_t rb = r0; rb < r1; rb += 64) {
            const int64_t n = (rb + 64 < r1 ? rb + 64 : r1) - rb;
            memset(acc, 0, sizeof acc);
            for (int64_t jm = 0; jm < J * M; jm++) {
                const uint8_t *c = codes + jm * R + rb;
                const float *l = lut + jm * 256;
                for (int64_t i = 0; i < n; i++) acc[i] += l[c[i]];
            }
            for (int64_t i = 0; i < n; i++) y[rb + i] = acc[i] * t->scales[rb + i];
        }
    } else {
        const uint16_t *codes = (const uint16_t *)t->codes;
        const int64_t K = (int64_t)1 << t->B;
        for (int64_t rb = r0; rb < r1; rb += 64) {
            const int64_t n = (rb + 64 < r1 ? rb + 64 : r1) - rb;
            memset(acc, 0, sizeof acc);
            for (int64_t j = 0; j < J; j++) {
                const float *xj = x + j * g;
                for (int64_t m = 0; m < M; m++) {
                    const uint16_t *c = codes + (j * M + m) * R + rb;
                    const float *cb = t->codebooks + m * K * g;
                    for (int64_t i = 0; i < n; i++) {
                        const float *e = cb + (int64_t)c[i] * g;
                        float dot = 0.f;
                        for (int64_t d = 0; d < g; d++) dot += e[d] * xj[d];
                        acc[i] += dot;
                    }
                }
            }
            for (int64_t i = 0; i < n; i++) y[rb + i] = acc[i] * t->scales[rb + i];
        }
    }
}

void qg_gemm_tile_scalar(const float *X, int64_t N, int64_t C, const float *Wt, int64_t nr,
                         float *Y, int64_t ldy) {
    for (int64_t n = 0; n < N; n++) {
        const float *xn = X + n * C;
        for (int64_t r = 0; r < nr; r++) {
            Y[n * ldy + r] = qg_dot_f32(xn, Wt + r * C, C);
        }
    }
}

const qg_type_traits qg_traits_scalar[QG_TYPE_COUNT] = {
    [QG_TYPE_AQ] = {"aq", qg_aq_dequantize_rows_scalar, qg_aq_prep_size, qg_aq_prepare_scalar,
                    qg_aq_vec_rows_scalar, qg_gemm_tile_scalar, .table_bits = 32},
    [QG_TYPE_VQ] = {"vq", qg_vq_dequantize_rows_scalar, qg_vq_prep_size, qg_vq_prepare_scalar,
                    qg_vq_vec_rows_scalar, qg_gemm_tile_scalar}, /* qg_vq_scalar.c */
};

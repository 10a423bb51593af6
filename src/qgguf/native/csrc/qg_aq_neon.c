/* NEON (aarch64) kernels: correctness first. NEON has no gather, so the Kx8 row kernel does
 * scalar table lookups into vector accumulators. */
#include "qg_native.h"
#if defined(QG_ARM64)
#include <arm_neon.h>
#include <string.h>

static void dequantize_rows_neon(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t R = t->R, C = t->C, g = t->g, M = t->M, J = C / g;
    const int64_t K = (int64_t)1 << t->B;
    if (g % 4) { qg_aq_dequantize_rows_scalar(t, r0, r1, out); return; }
    const uint8_t *c8 = (const uint8_t *)t->codes;
    const uint16_t *c16 = (const uint16_t *)t->codes;
    const int b8 = t->B == 8;
    for (int64_t rb = r0; rb < r1; rb += 64) {
        const int64_t re = rb + 64 < r1 ? rb + 64 : r1;
        for (int64_t r = rb; r < re; r++)
            for (int64_t j = 0; j < J; j++) {
                float *o = out + (r - r0) * C + j * g;
                const int64_t ci = j * M * R + r;
                for (int64_t h = 0; h < g; h += 4) {
                    float32x4_t acc = vld1q_f32(t->codebooks + (b8 ? c8[ci] : c16[ci]) * g + h);
                    for (int64_t m = 1; m < M; m++) {
                        const int64_t k = b8 ? c8[ci + m * R] : c16[ci + m * R];
                        acc = vaddq_f32(acc, vld1q_f32(t->codebooks + (m * K + k) * g + h));
                    }
                    vst1q_f32(o + h, vmulq_n_f32(acc, t->scales[r]));
                }
            }
    }
}

static void prepare_neon(const qg_tensor *t, const float *x, float *lut, int64_t j0, int64_t j1) {
    const int64_t g = t->g, M = t->M;
    for (int64_t j = j0; j < j1; j++) {
        const float *xj = x + j * g;
        for (int64_t m = 0; m < M; m++) {
            const float *cb = t->cbT + m * g * 256;
            float *l = lut + (j * M + m) * 256;
            for (int kb = 0; kb < 256; kb += 8) {
                float32x4_t a0 = vmulq_n_f32(vld1q_f32(cb + kb), xj[0]);
                float32x4_t a1 = vmulq_n_f32(vld1q_f32(cb + kb + 4), xj[0]);
                for (int64_t d = 1; d < g; d++) {
                    a0 = vfmaq_n_f32(a0, vld1q_f32(cb + d * 256 + kb), xj[d]);
                    a1 = vfmaq_n_f32(a1, vld1q_f32(cb + d * 256 + kb + 4), xj[d]);
                }
                vst1q_f32(l + kb, a0);
                vst1q_f32(l + kb + 4, a1);
            }
        }
    }
}

static void vec_rows_neon(const qg_tensor *t, const float *x, const float *lut, float *y,
                          int64_t r0, int64_t r1) {
    const int64_t R = t->R, M = t->M, g = t->g, J = t->C / g;
    if (t->B != 8) { /* Mx16: dequantize-and-dot, 4 rows at a time */
        if (g % 4) { qg_aq_vec_rows_scalar(t, x, lut, y, r0, r1); return; }
        const int64_t K = (int64_t)1 << t->B;
        const uint16_t *codes = (const uint16_t *)t->codes;
        const int64_t e4 = r0 + (r1 - r0) / 4 * 4;
        for (int64_t rb = r0; rb < e4; rb += 4) {
            float32x4_t acc[4] = {vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0), vdupq_n_f32(0)};
            for (int64_t j = 0; j < J; j++)
                for (int64_t m = 0; m < M; m++) {
                    const uint16_t *c = codes + (j * M + m) * R + rb;
                    const float *cb = t->codebooks + m * K * g;
                    for (int64_t h = 0; h < g; h += 4) {
                        const float32x4_t xv = vld1q_f32(x + j * g + h);
                        for (int i = 0; i < 4; i++)
                            acc[i] = vfmaq_f32(acc[i], vld1q_f32(cb + (int64_t)c[i] * g + h), xv);
                    }
                }
            for (int i = 0; i < 4; i++) y[rb + i] = vaddvq_f32(acc[i]) * t->scales[rb + i];
        }
        if (e4 < r1) qg_aq_vec_rows_scalar(t, x, NULL, y, e4, r1);
        return;
    }
    const uint8_t *codes = (const uint8_t *)t->codes;
    const int64_t e16 = r0 + (r1 - r0) / 16 * 16;
    for (int64_t jt = 0; jt < J; jt += QG_JTILE) {
        const int64_t je = jt + QG_JTILE < J ? jt + QG_JTILE : J;
        for (int64_t rb = r0; rb < e16; rb += 16) {
            float32x4_t acc[4];
            for (int v = 0; v < 4; v++) acc[v] = jt == 0 ? vdupq_n_f32(0) : vld1q_f32(y + rb + 4 * v);
            for (int64_t jm = jt * M; jm < je * M; jm++) {
                const uint8_t *c = codes + jm * R + rb;
                const float *l = lut + jm * 256;
                for (int v = 0; v < 4; v++) {
                    float tmp[4] = {l[c[4 * v]], l[c[4 * v + 1]], l[c[4 * v + 2]], l[c[4 * v + 3]]};
                    acc[v] = vaddq_f32(acc[v], vld1q_f32(tmp));
                }
            }
            for (int v = 0; v < 4; v++) vst1q_f32(y + rb + 4 * v, acc[v]);
        }
    }
    for (int64_t rb = r0; rb < e16; rb += 4) vst1q_f32(y + rb, vmulq_f32(vld1q_f32(y + rb), vld1q_f32(t->scales + rb)));
    if (e16 < r1) qg_aq_vec_rows_scalar(t, x, lut, y, e16, r1);
}

const qg_type_traits qg_traits_neon[QG_TYPE_COUNT] = {
    [QG_TYPE_AQ] = {"aq", dequantize_rows_neon, qg_aq_prep_size, prepare_neon, vec_rows_neon,
                    qg_gemm_tile_scalar, .table_bits = 32},
    [QG_TYPE_VQ] = {"vq", qg_vq_dequantize_rows_neon, qg_vq_prep_size, qg_vq_prepare_scalar,
                    qg_vq_vec_rows_neon, qg_gemm_tile_scalar}, /* qg_vq_neon.c */
};
#endif

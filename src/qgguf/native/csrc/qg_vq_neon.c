/* VQ kernels, NEON (aarch64): dequantize-and-dot with 128-bit lanes for v = 4, 8, 16 (the
 * layout and arithmetic of the AVX2 file); other v: scalar.  Dequantization keeps the scalar
 * order of operations (add, multiply, add), so it is exact. */
#include "qg_native.h"
#if defined(QG_ARM64)
#include <arm_neon.h>
#include <string.h>

#define VQ_SIDE(t) ((const qg_vq_side *)(t)->aux1)

static void rows_neon(const qg_tensor *t, const float *prep, float *y, int64_t b0, int64_t b1) {
    const int64_t V = t->M, NV = V / 4, C = t->C, n_out = t->iparam[3], nc = C - n_out;
    const int64_t k = t->iparam[0], kr = t->iparam[2], G = t->iparam[4], gs = t->iparam[5];
    const int KB = t->B, RB = (int)t->iparam[1];
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    for (int64_t b = b0; b < b1; b++) {
        float32x4_t a[4];
        for (int h = 0; h < 4; h++) a[h] = vdupq_n_f32(0.f);
        int64_t p = 0;
        for (; p < n_out; p++) {
            const float *e = sd->obook + (int64_t)qg_vq_get(s, b * C + p, KB) * V;
            for (int64_t h = 0; h < NV; h++) a[h] = vfmaq_n_f32(a[h], vld1q_f32(e + 4 * h), prep[p]);
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t pe = n_out + (g + 1) * gs < C ? n_out + (g + 1) * gs : C;
            const float *book = t->codebooks + g * k * V;
            for (; p < pe; p++) {
                const float *e = book + (int64_t)qg_vq_get(s, b * C + p, KB) * V;
                if (RB) {
                    const float *re = sd->rbooks + (g * kr + qg_vq_get(rs, b * nc + p - n_out, RB)) * V;
                    for (int64_t h = 0; h < NV; h++)
                        a[h] = vfmaq_n_f32(a[h], vaddq_f32(vld1q_f32(e + 4 * h), vld1q_f32(re + 4 * h)), prep[p]);
                } else {
                    for (int64_t h = 0; h < NV; h++) a[h] = vfmaq_n_f32(a[h], vld1q_f32(e + 4 * h), prep[p]);
                }
            }
        }
        for (int64_t h = 0; h < NV; h++) vst1q_f32(y + b * V + 4 * h, vaddq_f32(a[h], vdupq_n_f32(beta)));
    }
}

void qg_vq_vec_rows_neon(const qg_tensor *t, const float *x, const float *prep, float *y,
                         int64_t r0, int64_t r1) {
    const int64_t v = t->M;
    if ((v != 4 && v != 8 && v != 16) || r0 % v || r1 % v) {
        qg_vq_vec_rows_scalar(t, x, prep, y, r0, r1);
        return;
    }
    rows_neon(t, prep, y, r0 / v, r1 / v);
}

void qg_vq_dequantize_rows_neon(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t v = t->M, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], gs = t->iparam[5];
    const int rbits = (int)t->iparam[1];
    if (v != 4 && v != 8 && v != 16) { qg_vq_dequantize_rows_scalar(t, r0, r1, out); return; }
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    float q[16];
    for (int64_t b = r0 / v; b * v < r1; b++) {
        const int64_t i0 = b * v < r0 ? r0 - b * v : 0;
        const int64_t i1 = b * v + v > r1 ? r1 - b * v : v;
        for (int64_t p = 0; p < C; p++) {
            const uint32_t ix = qg_vq_get(s, b * C + p, t->B);
            const float *e, *re = NULL;
            if (p < n_out) e = sd->obook + (int64_t)ix * v;
            else {
                const int64_t g = (p - n_out) / gs;
                e = t->codebooks + (g * k + ix) * v;
                if (rbits) re = sd->rbooks + (g * kr + qg_vq_get(rs, b * nc + p - n_out, rbits)) * v;
            }
            const float32x4_t sc = vdupq_n_f32(t->scales[p]), bi = vdupq_n_f32(sd->colbias[p]);
            for (int64_t h = 0; h < v; h += 4) {
                float32x4_t c = vld1q_f32(e + h);
                if (re) c = vaddq_f32(c, vld1q_f32(re + h));
                vst1q_f32(q + h, vaddq_f32(vmulq_f32(c, sc), bi));
            }
            float *o = out + (b * v - r0) * C + sd->perm[p];
            for (int64_t i = i0; i < i1; i++) o[i * C] = q[i];
        }
    }
}
#endif

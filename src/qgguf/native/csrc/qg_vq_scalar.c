/* VQ (VPTQ-style vector quantization): portable scalar kernels (reference path, tails, fallback).
 * Layout: qg_native.h ("VQ").  The index streams are read packed, element by element. */
#include "qg_native.h"
#include <string.h>

#define VQ_SIDE(t) ((const qg_vq_side *)(t)->aux1)

/* the codebook entry of position p for main index ix: float32 [v] */
static inline const float *vq_book(const qg_tensor *t, int64_t p, uint32_t ix, int64_t *grp) {
    const int64_t v = t->M, n_out = t->iparam[3];
    if (p < n_out) { *grp = -1; return VQ_SIDE(t)->obook + (int64_t)ix * v; }
    const int64_t g = (p - n_out) / t->iparam[5];
    *grp = g;
    return t->codebooks + (g * t->iparam[0] + ix) * v;
}

void qg_vq_dequantize_rows_scalar(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t v = t->M, C = t->C, n_out = t->iparam[3], nc = C - n_out, kr = t->iparam[2];
    const int rbits = (int)t->iparam[1];
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    float q[16];
    for (int64_t b = r0 / v; b * v < r1; b++) {
        const int64_t i0 = b * v < r0 ? r0 - b * v : 0;
        const int64_t i1 = b * v + v > r1 ? r1 - b * v : v;
        for (int64_t p = 0; p < C; p++) {
            int64_t grp;
            const float *e = vq_book(t, p, qg_vq_get(s, b * C + p, t->B), &grp);
            for (int64_t i = 0; i < v; i++) q[i] = e[i];
            if (rbits && grp >= 0) {
                const float *re = sd->rbooks + (grp * kr + qg_vq_get(rs, b * nc + p - n_out, rbits)) * v;
                for (int64_t i = 0; i < v; i++) q[i] += re[i];
            }
            const float sc = t->scales[p], bi = sd->colbias[p];
            const int64_t col = sd->perm[p];
            for (int64_t i = i0; i < i1; i++) {
                float w = q[i] * sc;
                w = w + bi;
                out[(b * v + i - r0) * C + col] = w;
            }
        }
    }
}

/* prep: xs[C] = x[perm[p]] * scale[p], then one partial bias sum per prepare tile */
int64_t qg_vq_prep_size(const qg_tensor *t) {
    const int64_t J = t->C / t->g;
    return t->C + (J + QG_JTILE - 1) / QG_JTILE;
}

void qg_vq_prepare_scalar(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1) {
    const qg_vq_side *sd = VQ_SIDE(t);
    float bsum = 0.f;
    for (int64_t p = j0 * t->g; p < j1 * t->g; p++) {
        const float xv = x[sd->perm[p]];
        prep[p] = xv * t->scales[p];
        bsum += xv * sd->colbias[p];
    }
    prep[t->C + j0 / QG_JTILE] = bsum;
}

float qg_vq_bias_term(const qg_tensor *t, const float *prep) {
    const int64_t J = t->C / t->g, n = (J + QG_JTILE - 1) / QG_JTILE;
    float s = 0.f;
    for (int64_t i = 0; i < n; i++) s += prep[t->C + i];
    return s;
}

void qg_vq_vec_rows_scalar(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1) {
    (void)x;
    const int64_t v = t->M, C = t->C, n_out = t->iparam[3], nc = C - n_out, kr = t->iparam[2];
    const int rbits = (int)t->iparam[1];
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    float acc[16];
    for (int64_t b = r0 / v; b * v < r1; b++) {
        for (int64_t i = 0; i < v; i++) acc[i] = 0.f;
        for (int64_t p = 0; p < C; p++) {
            int64_t grp;
            const float *e = vq_book(t, p, qg_vq_get(s, b * C + p, t->B), &grp);
            const float xs = prep[p];
            if (rbits && grp >= 0) {
                const float *re = sd->rbooks + (grp * kr + qg_vq_get(rs, b * nc + p - n_out, rbits)) * v;
                for (int64_t i = 0; i < v; i++) acc[i] += xs * (e[i] + re[i]);
            } else {
                for (int64_t i = 0; i < v; i++) acc[i] += xs * e[i];
            }
        }
        for (int64_t i = 0; i < v; i++) {
            const int64_t r = b * v + i;
            if (r >= r0 && r < r1) y[r] = acc[i] + beta;
        }
    }
}

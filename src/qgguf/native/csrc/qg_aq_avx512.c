/* AVX-512 (F, BW, VL, DQ, VBMI) kernels. */
#include "qg_native.h"
#if defined(QG_X86)
#define QG_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx512vbmi,avx512vnni,avx2,fma,f16c"
#include "qg_target_begin.h"
#include <immintrin.h>
#include <string.h>
#include <stdlib.h>
#include <math.h>

#define AI static inline __attribute__((always_inline))

/* ---- dequantize: exact (adds in codebook order, then one multiply) ---- */
static void dequantize_rows_avx512(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t R = t->R, C = t->C, g = t->g, M = t->M, J = C / g;
    const int64_t K = (int64_t)1 << t->B;
    const uint8_t *c8 = (const uint8_t *)t->codes;
    const uint16_t *c16 = (const uint16_t *)t->codes;
    const int b8 = t->B == 8;
    for (int64_t rb = r0; rb < r1; rb += 64) {
        const int64_t re = rb + 64 < r1 ? rb + 64 : r1;
        for (int64_t r = rb; r < re; r++) {
            for (int64_t j = 0; j < J; j++) {
                float *o = out + (r - r0) * C + j * g;
                const int64_t ci = j * M * R + r;
                if (g == 4) {
                    __m128 acc = _mm_loadu_ps(t->codebooks + (b8 ? c8[ci] : c16[ci]) * 4);
                    for (int64_t m = 1; m < M; m++) {
                        const int64_t k = b8 ? c8[ci + m * R] : c16[ci + m * R];
                        acc = _mm_add_ps(acc, _mm_loadu_ps(t->codebooks + (m * K + k) * 4));
                    }
                    _mm_storeu_ps(o, _mm_mul_ps(acc, _mm_set1_ps(t->scales[r])));
                } else if (g == 8) {
                    __m256 acc = _mm256_loadu_ps(t->codebooks + (b8 ? c8[ci] : c16[ci]) * 8);
                    for (int64_t m = 1; m < M; m++) {
                        const int64_t k = b8 ? c8[ci + m * R] : c16[ci + m * R];
                        acc = _mm256_add_ps(acc, _mm256_loadu_ps(t->codebooks + (m * K + k) * 8));
                    }
                    _mm256_storeu_ps(o, _mm256_mul_ps(acc, _mm256_set1_ps(t->scales[r])));
                } else {
                    __m512 acc = _mm512_loadu_ps(t->codebooks + (b8 ? c8[ci] : c16[ci]) * 16);
                    for (int64_t m = 1; m < M; m++) {
                        const int64_t k = b8 ? c8[ci + m * R] : c16[ci + m * R];
                        acc = _mm512_add_ps(acc, _mm512_loadu_ps(t->codebooks + (m * K + k) * 16));
                    }
                    _mm512_storeu_ps(o, _mm512_mul_ps(acc, _mm512_set1_ps(t->scales[r])));
                }
            }
        }
    }
}

/* ---- Kx8 lookup tables: LUT[j][m][k] = dot(cb[m][k], x_j), from cbT[m][d][k] ---- */
/* the float tables of groups [j0, j1) (g <= 16) into out[(j - jbase)*M + m][256]; with `track` (a constant at
 * each call) also the largest |entry|, taken while the entries are in registers (else 0) */
AI float lut_rows(const qg_tensor *t, const float *x, float *out, int64_t j0, int64_t j1, int64_t jbase,
                  const int track) {
    const int64_t g = t->g, M = t->M;
    __m512 mx = _mm512_setzero_ps();
    for (int64_t j = j0; j < j1; j++) {
        __m512 xs[16];
        for (int64_t d = 0; d < g; d++) xs[d] = _mm512_set1_ps(x[j * g + d]);
        for (int64_t m = 0; m < M; m++) {
            const float *cb = t->cbT + m * g * 256;
            float *l = out + ((j - jbase) * M + m) * 256;
            for (int kb = 0; kb < 256; kb += 64) {
                __m512 a0 = _mm512_mul_ps(_mm512_loadu_ps(cb + kb), xs[0]);
                __m512 a1 = _mm512_mul_ps(_mm512_loadu_ps(cb + kb + 16), xs[0]);
                __m512 a2 = _mm512_mul_ps(_mm512_loadu_ps(cb + kb + 32), xs[0]);
                __m512 a3 = _mm512_mul_ps(_mm512_loadu_ps(cb + kb + 48), xs[0]);
                for (int64_t d = 1; d < g; d++) {
                    const float *p = cb + d * 256 + kb;
                    a0 = _mm512_fmadd_ps(_mm512_loadu_ps(p), xs[d], a0);
                    a1 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 16), xs[d], a1);
                    a2 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 32), xs[d], a2);
                    a3 = _mm512_fmadd_ps(_mm512_loadu_ps(p + 48), xs[d], a3);
                }
                _mm512_storeu_ps(l + kb, a0);
                _mm512_storeu_ps(l + kb + 16, a1);
                _mm512_storeu_ps(l + kb + 32, a2);
                _mm512_storeu_ps(l + kb + 48, a3);
                if (track)
                    mx = _mm512_max_ps(mx, _mm512_max_ps(_mm512_max_ps(_mm512_abs_ps(a0), _mm512_abs_ps(a1)),
                                                         _mm512_max_ps(_mm512_abs_ps(a2), _mm512_abs_ps(a3))));
            }
        }
    }
    return track ? _mm512_reduce_max_ps(mx) : 0.f;
}

static void prepare_avx512(const qg_tensor *t, const float *x, float *lut, int64_t j0, int64_t j1) {
    lut_rows(t, x, lut, j0, j1, 0, 0);
}

/* ---- Kx8 rows, VBMI path (the default on AVX-512): the float LUT of each block of QG_JTILE
 * input groups is quantized to int16 with one float scale per block (q = round(v/S), |q| <= 32767),
 * stored as two 256-byte tables (low and high bytes) per (j, m).  64 rows at a time:
 *   bytes = vpermi2b x2 + blend on bit 7 of the code (a 256-entry byte table in 4 zmm), for the low and
 *   the high bytes; unpacklo/hi_epi8(low, high) rebuild the rows' int16 entries, and
 *   int32 accumulators += int16 via vpdpwssd with the word selectors (1,0) and (0,1)
 * (4 dot-product instructions per 64 codes; the block result is un-permuted when written out).  The int32 sums
 * are exact, so the result equals the earlier uint16 + 8 x vpdpbusd formulation bit for bit.
 * Relative error of y ~ 1e-5..1e-4 (16-bit table entries), see tests/test_native_aq.py.
 * Measured on Zen (4096x11008, 2x8-g8, 1 thread): 0.05 ns per code lookup, vs 0.35-0.7 ns for
 * a float LUT + 16-lane gathers (the AVX2 path's method), so gathers were dropped here. ---- */
static int64_t prep_size_avx512(const qg_tensor *t) {
    if (t->B != 8) return 0;
    const int64_t J = t->C / t->g, nb = (J + QG_JTILE - 1) / QG_JTILE;
    return J * t->M * 512 / 4 + nb + 16; /* floats: byte tables, then block scales */
}

/* float tables of groups [jb, je) (g <= 16) into buf[(j-jb)*M + m][256], as prepare_avx512; returns the largest
 * |entry| (the block scale's amax) */
static float lut_tile_max(const qg_tensor *t, const float *x, float *buf, int64_t jb, int64_t je) {
    return lut_rows(t, x, buf, jb, je, jb, 1);
}

/* byte permutation of _mm512_packs_epi32(qa, qb) (lane l holds qa[4l..4l+3], qb[4l..4l+3] as words) that puts
 * the low bytes of entries 0..31 (qa = entries 0..15, qb = 16..31) in bytes 0..31 and the high bytes in 32..63 */
static const uint8_t split_idx[64] __attribute__((aligned(64))) = {
#define W(e) ((e) < 16 ? ((e) / 4) * 8 + (e) % 4 : (((e) - 16) / 4) * 8 + 4 + ((e) - 16) % 4)
#define ROW8(b, o) 2 * W(b) + o, 2 * W(b + 1) + o, 2 * W(b + 2) + o, 2 * W(b + 3) + o, \
                   2 * W(b + 4) + o, 2 * W(b + 5) + o, 2 * W(b + 6) + o, 2 * W(b + 7) + o
    ROW8(0, 0), ROW8(8, 0), ROW8(16, 0), ROW8(24, 0), ROW8(0, 1), ROW8(8, 1), ROW8(16, 1), ROW8(24, 1)
#undef ROW8
#undef W
};

static void prepare_vbmi(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1) {
    const int64_t M = t->M, J = t->C / t->g;
    uint8_t *tab = (uint8_t *)prep;
    float *bscale = prep + J * M * 512 / 4;
    /* one tile's float tables: on the stack up to M = 4 (64 KiB), else on the heap */
    float stackbuf[QG_JTILE * 4 * 256] __attribute__((aligned(64)));
    float *buf = M <= 4 ? stackbuf : aligned_alloc(64, (size_t)QG_JTILE * M * 256 * sizeof(float));
    if (!buf) { /* cannot happen in practice; keep a defined result */
        memset(tab + j0 * M * 512, 0x80, (size_t)((j1 - j0) * M * 512));
        for (int64_t b = j0 / QG_JTILE; b * QG_JTILE < j1; b++) bscale[b] = 0.f;
        return;
    }
    const __m512i perm = _mm512_load_si512(split_idx);
    for (int64_t jb = j0; jb < j1; jb += QG_JTILE) { /* j0 is a multiple of QG_JTILE */
        const int64_t je = jb + QG_JTILE < J ? jb + QG_JTILE : J;
        const float amax = lut_tile_max(t, x, buf, jb, je);
        const float S = amax > 0.f ? amax / 32767.f : 0.f;
        bscale[jb / QG_JTILE] = S;
        const __m512 inv = _mm512_set1_ps(amax > 0.f ? 32767.f / amax : 0.f);
        const __m512i lo16 = _mm512_set1_epi32(-32767), hi16 = _mm512_set1_epi32(32767);
        for (int64_t jm = 0; jm < (je - jb) * M; jm++) {
            uint8_t *lo = tab + (jb * M + jm) * 512, *hi = lo + 256;
            const float *src = buf + jm * 256;
            for (int k = 0; k < 256; k += 32) {
                /* q = clamp(round(v / S), -32767, 32767) as int16: low bytes to lo, high bytes to hi (a NaN
                   converts to INT_MIN and clamps to -32767) */
                __m512i qa = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(src + k), inv));
                __m512i qb = _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(src + k + 16), inv));
                qa = _mm512_min_epi32(_mm512_max_epi32(qa, lo16), hi16);
                qb = _mm512_min_epi32(_mm512_max_epi32(qb, lo16), hi16);
                const __m512i w = _mm512_permutexvar_epi8(perm, _mm512_packs_epi32(qa, qb));
                _mm256_storeu_si256((__m256i *)(lo + k), _mm512_castsi512_si256(w));
                _mm256_storeu_si256((__m256i *)(hi + k), _mm512_extracti64x4_epi64(w, 1));
            }
        }
    }
    if (buf != stackbuf) free(buf);
}

#ifndef QG_PREFETCH_BLOCKS
#define QG_PREFETCH_BLOCKS 4
#endif
/* the byte lanes of a 64-row block with n rows left (all of them for n >= 64) */
AI __mmask64 rows_mask(int64_t n) { return n >= 64 ? ~(__mmask64)0 : n <= 0 ? 0 : (((__mmask64)1 << n) - 1); }
AI __m512i lookup256(const uint8_t *tab, __m512i idx, __mmask64 top) {
    const __m512i a = _mm512_permutex2var_epi8(_mm512_loadu_si512(tab), idx, _mm512_loadu_si512(tab + 64));
    const __m512i b = _mm512_permutex2var_epi8(_mm512_loadu_si512(tab + 128), idx, _mm512_loadu_si512(tab + 192));
    return _mm512_mask_blend_epi8(top, a, b);
}

/* NB blocks of 64 rows starting at rb; acc results go to yp (permuted order, see vec_rows_k8_vbmi) */
/* c: codes of (jm0, first row); jstride: bytes from one jm to the next; bstride: bytes from one
 * 64-row block to the next */
AI void vbmi_block(const uint8_t *c, int64_t jstride, int64_t bstride, const uint8_t *tab,
                   int64_t nrows, int64_t jm0, int64_t jm1, float S, float *yp, const int NB) {
    /* int16 pairs (1, 0) and (0, 1): vpdpwssd adds the even / the odd word of each dword */
    const __m512i even = _mm512_set1_epi32(1), odd = _mm512_set1_epi32(1 << 16);
    __m512i acc[2][4];
    __mmask64 lm[2];
    for (int b = 0; b < NB; b++) {
        lm[b] = rows_mask(nrows - 64 * b);
        for (int k = 0; k < 4; k++) acc[b][k] = _mm512_setzero_si512();
    }
    const uint8_t *tb = tab + jm0 * 512;
    for (int64_t jm = jm0; jm < jm1; jm++, c += jstride, tb += 512) {
        if (QG_PREFETCH_BLOCKS) _mm_prefetch((const char *)(c + bstride * (NB + QG_PREFETCH_BLOCKS)), _MM_HINT_T0);
        for (int b = 0; b < NB; b++) {
            const __m512i idx = lm[b] == ~(__mmask64)0 ? _mm512_loadu_si512(c + bstride * b)
                                                       : _mm512_maskz_loadu_epi8(lm[b], c + bstride * b);
            const __mmask64 top = _mm512_movepi8_mask(idx);
            const __m512i lo = lookup256(tb, idx, top), hi = lookup256(tb + 256, idx, top);
            /* the rows' int16 entries: bytes 0-7 (unpacklo) and 8-15 (unpackhi) of each 16-row lane */
            const __m512i wl = _mm512_unpacklo_epi8(lo, hi), wh = _mm512_unpackhi_epi8(lo, hi);
            acc[b][0] = _mm512_dpwssd_epi32(acc[b][0], wl, even);
            acc[b][1] = _mm512_dpwssd_epi32(acc[b][1], wl, odd);
            acc[b][2] = _mm512_dpwssd_epi32(acc[b][2], wh, even);
            acc[b][3] = _mm512_dpwssd_epi32(acc[b][3], wh, odd);
        }
    }
    const __m512 vs = _mm512_set1_ps(S);
    for (int b = 0; b < NB; b++)
        for (int k = 0; k < 4; k++) {
            float *p = yp + 64 * b + 16 * k;
            _mm512_storeu_ps(p, _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b][k]), vs, _mm512_loadu_ps(p)));
        }
}

static void vec_rows_k8_vbmi(const qg_tensor *t, const float *prep, float *y, int64_t r0, int64_t r1) {
    const int64_t R = t->R, M = t->M, J = t->C / t->g;
    const uint8_t *codes = (const uint8_t *)t->codes;
    const uint8_t *tab = (const uint8_t *)prep;
    const float *bscale = prep + J * M * 512 / 4;
    const int64_t n = r1 - r0, nblk = (n + 63) / 64;
    float *yp = aligned_alloc(64, (size_t)nblk * 64 * sizeof(float));
    if (!yp) { qg_aq_vec_rows_scalar(t, NULL, NULL, y, r0, r1); return; } /* unreachable */
    memset(yp, 0, (size_t)nblk * 64 * sizeof(float));
    /* block-major codes (t->codes_tiled, see qg_native.h) or the stored [J][M][R] ones */
    const uint8_t *tiled = r0 % 64 ? NULL : (const uint8_t *)t->codes_tiled;
    const int64_t js = tiled ? 64 : R, bs = tiled ? J * M * 64 : 64;
    for (int64_t jt = 0; jt < J; jt += QG_JTILE) {
        const int64_t je = jt + QG_JTILE < J ? jt + QG_JTILE : J;
        const float S = bscale[jt / QG_JTILE];
        const uint8_t *c0 = tiled ? tiled + (r0 / 64) * bs + jt * M * 64 : codes + jt * M * R + r0;
        int64_t b = 0;
        for (; b + 2 <= nblk; b += 2)
            vbmi_block(c0 + b * bs, js, bs, tab, n - 64 * b, jt * M, je * M, S, yp + 64 * b, 2);
        for (; b < nblk; b++)
            vbmi_block(c0 + b * bs, js, bs, tab, n - 64 * b, jt * M, je * M, S, yp + 64 * b, 1);
    }
    /* un-permute: row w of a block (16-row lane l = w/16, w%16 = 8h + 2k + o) is at 16 (2h + o) + 4l + k */
    for (int64_t r = r0; r < r1; r++) {
        const int64_t o = r - r0, blk = o & ~(int64_t)63, w = o & 63, l = w >> 4, q = w & 15;
        y[r] = yp[blk + 16 * (2 * (q >> 3) + (q & 1)) + 4 * l + ((q & 7) >> 1)] * t->scales[r];
    }
    free(yp);
}

/* ---- 1x16 (and Mx16): dequantize-and-dot, 16 rows at a time ---- */
AI float hsum256(__m256 v) {
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_movehdup_ps(s));
    return _mm_cvtss_f32(s);
}

static void vec_rows_k16_avx512(const qg_tensor *t, const float *x, float *y, int64_t r0, int64_t r1) {
    const int64_t R = t->R, M = t->M, g = t->g, J = t->C / g;
    const int64_t K = (int64_t)1 << t->B;
    if (g == 4) { qg_aq_vec_rows_scalar(t, x, NULL, y, r0, r1); return; } /* Mx16 with g = 4 */
    const uint16_t *codes = (const uint16_t *)t->codes;
    const int64_t e16 = r0 + (r1 - r0) / 16 * 16;
    for (int64_t rb = r0; rb < e16; rb += 16) {
        if (g == 8) {
            __m256 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm256_setzero_ps();
            for (int64_t j = 0; j < J; j++) {
                const __m256 xj = _mm256_loadu_ps(x + j * 8);
                for (int64_t m = 0; m < M; m++) {
                    const uint16_t *c = codes + (j * M + m) * R + rb;
                    const float *cb = t->codebooks + m * K * 8;
                    for (int i = 0; i < 16; i++)
                        acc[i] = _mm256_fmadd_ps(_mm256_loadu_ps(cb + (int64_t)c[i] * 8), xj, acc[i]);
                }
            }
            for (int i = 0; i < 16; i++) y[rb + i] = hsum256(acc[i]) * t->scales[rb + i];
        } else { /* g == 16 */
            __m512 acc[16];
            for (int i = 0; i < 16; i++) acc[i] = _mm512_setzero_ps();
            for (int64_t j = 0; j < J; j++) {
                const __m512 xj = _mm512_loadu_ps(x + j * 16);
                for (int64_t m = 0; m < M; m++) {
                    const uint16_t *c = codes + (j * M + m) * R + rb;
                    const float *cb = t->codebooks + m * K * 16;
                    for (int i = 0; i < 16; i++)
                        acc[i] = _mm512_fmadd_ps(_mm512_loadu_ps(cb + (int64_t)c[i] * 16), xj, acc[i]);
                }
            }
            for (int i = 0; i < 16; i++) y[rb + i] = _mm512_reduce_add_ps(acc[i]) * t->scales[rb + i];
        }
    }
    if (e16 < r1) qg_aq_vec_rows_scalar(t, x, NULL, y, e16, r1);
}

static void vec_rows_avx512(const qg_tensor *t, const float *x, const float *lut, float *y,
                            int64_t r0, int64_t r1) {
    if (t->B == 8) vec_rows_k8_vbmi(t, lut, y, r0, r1);
    else vec_rows_k16_avx512(t, x, y, r0, r1);
}

/* ---- Kx8 rows, one-token variant (qg_type_traits.vec_rows1): 8-bit tables ----
 * Decoding streams every weight once per token, so the row kernel must keep up with memory.  Here the float
 * tables are rounded to 8 bits (as llama.cpp rounds activations to 8 bits before its dot products), which halves
 * the byte lookups (two vpermi2b + a blend per 64 codes) and drops the unpacks of the 16-bit path:
 *   per tile of QG_JTILE groups a step S = amax / 127^2, and per table (j, m) an integer multiplier
 *   mu = ceil(127 amax_jm / amax) in [1, 127]: the table is stored as u = round(v / (S mu)) + 128 (a byte), so
 *   each table gets a step close to its own amax / 127 (an outlier channel coarsens one group's tables, not the
 *   tile's); the kernel adds mu * u per row with vpdpbusd (u: the unsigned bytes; mu: the signed selector byte
 *   at the row's position in the dword), its int32 accumulators start at -128 * sum(mu) (the offset), and
 *   y += S * acc after each tile.
 * Relative error of y ~7e-3, outlier channels or not (tests/test_native_aq.py).  Rows run block-major: a pair of
 * 64-row blocks goes through all tiles (the tables, J*M/4 KiB, stay in L2) while its codes, contiguous in
 * codes_tiled, stream with a software prefetch QG_PREFETCH_BYTES ahead: each thread reads one sequential run.
 * prep: [J*M][256] bytes u, [J*M][4] int32 selectors (mu << 8k, k = 0..3), [tiles] float S, [tiles] int32 offsets. */
#ifndef QG_PREFETCH_BYTES
#define QG_PREFETCH_BYTES 1024
#endif
static int64_t prep_size_vbmi8(const qg_tensor *t) {
    if (t->B != 8) return 0;
    const int64_t JM = t->C / t->g * t->M, nb = (t->C / t->g + QG_JTILE - 1) / QG_JTILE;
    return JM * 256 / 4 + JM * 4 + 2 * nb + 16;
}

static void prepare_vbmi8(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1) {
    const int64_t M = t->M, J = t->C / t->g, JM = J * M, nb = (J + QG_JTILE - 1) / QG_JTILE;
    uint8_t *tab = (uint8_t *)prep;
    int32_t *sel = (int32_t *)(prep + JM * 256 / 4);
    float *tscale = prep + JM * 256 / 4 + JM * 4;
    int32_t *toff = (int32_t *)(tscale + nb);
    float stackbuf[QG_JTILE * 4 * 256] __attribute__((aligned(64)));
    float *buf = M <= 4 ? stackbuf : aligned_alloc(64, (size_t)QG_JTILE * M * 256 * sizeof(float));
    if (!buf) { /* cannot happen in practice; keep a defined result (y = 0) */
        memset(tab + j0 * M * 256, 128, (size_t)((j1 - j0) * M * 256));
        for (int64_t jm = j0 * M; jm < j1 * M; jm++) sel[4 * jm] = 1, sel[4 * jm + 1] = 1 << 8,
                                                     sel[4 * jm + 2] = 1 << 16, sel[4 * jm + 3] = 1 << 24;
        for (int64_t b = j0 / QG_JTILE; b * QG_JTILE < j1; b++) tscale[b] = 0.f, toff[b] = 0;
        return;
    }
    for (int64_t jb = j0; jb < j1; jb += QG_JTILE) { /* j0 is a multiple of QG_JTILE */
        const int64_t je = jb + QG_JTILE < J ? jb + QG_JTILE : J;
        const float amax = lut_tile_max(t, x, buf, jb, je);
        tscale[jb / QG_JTILE] = amax > 0.f ? amax / (127.f * 127.f) : 0.f;
        int32_t musum = 0;
        for (int64_t jm = 0; jm < (je - jb) * M; jm++) {
            const float *src = buf + jm * 256;
            __m512 mx = _mm512_setzero_ps();
            for (int k = 0; k < 256; k += 16) mx = _mm512_max_ps(mx, _mm512_abs_ps(_mm512_load_ps(src + k)));
            const float a = _mm512_reduce_max_ps(mx);
            float muf = amax > 0.f ? ceilf(127.f * a / amax) : 1.f;
            muf = muf < 1.f ? 1.f : muf > 127.f ? 127.f : muf;
            const int32_t mu = (int32_t)muf;
            musum += mu;
            int32_t *sj = sel + 4 * (jb * M + jm);
            sj[0] = mu, sj[1] = mu << 8, sj[2] = mu << 16, sj[3] = mu << 24;
            const __m512 inv = _mm512_set1_ps(amax > 0.f ? 127.f * 127.f / (amax * muf) : 0.f);
            uint8_t *o = tab + (jb * M + jm) * 256;
            const __m128i off = _mm_set1_epi8((char)0x80);
            for (int k = 0; k < 256; k += 16) /* round to nearest, saturate to [-128, 127], + 128 */
                _mm_storeu_si128((__m128i *)(o + k), _mm_xor_si128(off, _mm512_cvtsepi32_epi8(
                                     _mm512_cvtps_epi32(_mm512_mul_ps(_mm512_load_ps(src + k), inv)))));
        }
        toff[jb / QG_JTILE] = -128 * musum;
    }
    if (buf != stackbuf) free(buf);
}

/* NB (1 or 2) 64-row blocks: yp[64 b + 16 k + d] = row 4 d + k of block b, unscaled by the row scales.  c: the
 * first block's codes of jm = 0; jstride: bytes from one jm to the next; bstride: from one block to the next;
 * tiled: block-major codes (jstride 64), where a prefetch past a block's end continues in the block NB further */
AI void vbmi8_rows(const uint8_t *c, int64_t jstride, int64_t bstride, int tiled, const uint8_t *tab,
                   const int32_t *sel, const float *tscale, const int32_t *toff, int64_t JM, int64_t tjm,
                   int64_t nrows, float *yp, const int NB) {
    const int64_t pfj = QG_PREFETCH_BYTES / 64; /* jm steps ahead */
    __m512 facc[2][4];
    __mmask64 lm[2];
    for (int b = 0; b < NB; b++) {
        lm[b] = rows_mask(nrows - 64 * b);
        for (int k = 0; k < 4; k++) facc[b][k] = _mm512_setzero_ps();
    }
    for (int64_t jm0 = 0; jm0 < JM; jm0 += tjm) {
        const int64_t jm1 = jm0 + tjm < JM ? jm0 + tjm : JM;
        __m512i acc[2][4];
        const __m512i a0 = _mm512_set1_epi32(toff[jm0 / tjm]);
        for (int b = 0; b < NB; b++)
            for (int k = 0; k < 4; k++) acc[b][k] = a0;
        const uint8_t *tb = tab + jm0 * 256;
        for (int64_t jm = jm0; jm < jm1; jm++, tb += 256) {
            const int64_t ja = jm + pfj;
            if (tiled || ja < JM)
                for (int b = 0; b < NB; b++)
                    _mm_prefetch((const char *)(c + b * bstride + ja * jstride + (ja < JM ? 0 : (NB - 1) * bstride)),
                                 _MM_HINT_T0);
            const int32_t *sj = sel + 4 * jm;
            for (int b = 0; b < NB; b++) {
                const uint8_t *cp = c + b * bstride + jm * jstride;
                const __m512i idx = lm[b] == ~(__mmask64)0 ? _mm512_loadu_si512(cp) : _mm512_maskz_loadu_epi8(lm[b], cp);
                const __m512i u = lookup256(tb, idx, _mm512_movepi8_mask(idx));
                for (int k = 0; k < 4; k++) acc[b][k] = _mm512_dpbusd_epi32(acc[b][k], u, _mm512_set1_epi32(sj[k]));
            }
        }
        const __m512 vs = _mm512_set1_ps(tscale[jm0 / tjm]);
        for (int b = 0; b < NB; b++)
            for (int k = 0; k < 4; k++) facc[b][k] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[b][k]), vs, facc[b][k]);
    }
    for (int b = 0; b < NB; b++)
        for (int k = 0; k < 4; k++) _mm512_store_ps(yp + 64 * b + 16 * k, facc[b][k]);
}

static void vec_rows_k8_vbmi8(const qg_tensor *t, const float *prep, float *y, int64_t r0, int64_t r1) {
    const int64_t R = t->R, M = t->M, J = t->C / t->g, JM = J * M, nb = (J + QG_JTILE - 1) / QG_JTILE;
    const uint8_t *tab = (const uint8_t *)prep;
    const int32_t *sel = (const int32_t *)(prep + JM * 256 / 4);
    const float *tscale = prep + JM * 256 / 4 + JM * 4;
    const int32_t *toff = (const int32_t *)(tscale + nb);
    const uint8_t *tiled = r0 % 64 ? NULL : (const uint8_t *)t->codes_tiled;
    const int64_t js = tiled ? 64 : R, bs = tiled ? JM * 64 : 64;
    const uint8_t *c0 = tiled ? tiled + (r0 / 64) * bs : (const uint8_t *)t->codes + r0;
    const int64_t n = r1 - r0;
    float yp[128] __attribute__((aligned(64)));
    for (int64_t b = 0; b * 64 < n; b += 2) {
        const int64_t left = n - 64 * b;
        if (left > 64)
            vbmi8_rows(c0 + b * bs, js, bs, tiled != NULL, tab, sel, tscale, toff, JM, QG_JTILE * M, left, yp, 2);
        else
            vbmi8_rows(c0 + b * bs, js, bs, tiled != NULL, tab, sel, tscale, toff, JM, QG_JTILE * M, left, yp, 1);
        for (int64_t w = 0; w < (left < 128 ? left : 128); w++) { /* un-permute (see vbmi8_rows) */
            const int64_t r = r0 + 64 * b + w;
            y[r] = yp[(w & 64) + 16 * (w & 3) + ((w & 63) >> 2)] * t->scales[r];
        }
    }
}

static void vec_rows1_avx512(const qg_tensor *t, const float *x, const float *prep, float *y,
                             int64_t r0, int64_t r1) {
    if (t->B == 8) vec_rows_k8_vbmi8(t, prep, y, r0, r1);
    else vec_rows_k16_avx512(t, x, y, r0, r1);
}

/* ---- blocked float dot on a dequantized tile: 4 tokens x 4 rows per micro-kernel ---- */
AI void mk_4x4(const float *X, int64_t C, const float *W, float *Y, int64_t ldy, int nn, int nr) {
    __m512 a[4][4];
    for (int i = 0; i < 4; i++)
        for (int k = 0; k < 4; k++) a[i][k] = _mm512_setzero_ps();
    int64_t c = 0;
    for (; c + 16 <= C; c += 16) {
        __m512 w[4], xv[4];
        for (int k = 0; k < 4; k++) w[k] = _mm512_loadu_ps(W + (k < nr ? k : 0) * C + c);
        for (int i = 0; i < 4; i++) xv[i] = _mm512_loadu_ps(X + (i < nn ? i : 0) * C + c);
        for (int i = 0; i < 4; i++)
            for (int k = 0; k < 4; k++) a[i][k] = _mm512_fmadd_ps(xv[i], w[k], a[i][k]);
    }
    if (c < C) {
        const __mmask16 mk = (__mmask16)((1u << (C - c)) - 1);
        __m512 w[4], xv[4];
        for (int k = 0; k < 4; k++) w[k] = _mm512_maskz_loadu_ps(mk, W + (k < nr ? k : 0) * C + c);
        for (int i = 0; i < 4; i++) xv[i] = _mm512_maskz_loadu_ps(mk, X + (i < nn ? i : 0) * C + c);
        for (int i = 0; i < 4; i++)
            for (int k = 0; k < 4; k++) a[i][k] = _mm512_fmadd_ps(xv[i], w[k], a[i][k]);
    }
    for (int i = 0; i < nn; i++)
        for (int k = 0; k < nr; k++) Y[i * ldy + k] = _mm512_reduce_add_ps(a[i][k]);
}

static void gemm_tile_avx512(const float *X, int64_t N, int64_t C, const float *Wt, int64_t nr,
                             float *Y, int64_t ldy) {
    for (int64_t n = 0; n < N; n += 4) {
        const int nn = N - n < 4 ? (int)(N - n) : 4;
        for (int64_t r = 0; r < nr; r += 4) {
            const int rr = nr - r < 4 ? (int)(nr - r) : 4;
            if (nn == 4 && rr == 4) mk_4x4(X + n * C, C, Wt + r * C, Y + n * ldy + r, ldy, 4, 4);
            else mk_4x4(X + n * C, C, Wt + r * C, Y + n * ldy + r, ldy, nn, rr);
        }
    }
}

const qg_type_traits qg_traits_avx512[QG_TYPE_COUNT] = {
    [QG_TYPE_AQ] = {"aq", dequantize_rows_avx512, prep_size_avx512, prepare_vbmi,
                    vec_rows_avx512, gemm_tile_avx512, prep_size_vbmi8, prepare_vbmi8, vec_rows1_avx512,
                    .table_bits = 16, .table_bits1 = 8},
    [QG_TYPE_VQ] = {"vq", qg_vq_dequantize_rows_avx512, qg_vq_prep_size_avx512, qg_vq_prepare_avx512,
                    qg_vq_vec_rows_avx512, gemm_tile_avx512}, /* qg_vq_avx512.c */
};

#include "qg_target_end.h"
#endif

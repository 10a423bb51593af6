/* VQ kernels, AVX-512: the matvec of small codebooks (k, kr <= 128) with register lookup tables, other
 * codebooks through the AVX2 kernels (faster there, see below; every AVX-512 CPU the core selects has
 * AVX2); dequantization of vectors of 16 in one 512-bit lane. */
#include "qg_native.h"
#if defined(QG_X86)
#define QG_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c"
#include "qg_target_begin.h"
#include <immintrin.h>
#include <string.h>

#define AI static inline __attribute__((always_inline))
#define VQ_SIDE(t) ((const qg_vq_side *)(t)->aux1)

/* ---- small codebooks (k <= 128, kr <= 128 or none): register lookup tables ----
 * The dot form: for vector row b and component i, y[b*v+i] = sum_p xs[p] * T_i[idx(b, p)] with
 * T_i[j] = book[j][i] (+ the same with the residual table).  Sixteen consecutive positions of one row
 * are one zmm: their packed indices (16 x w <= 112 bits, contiguous) go to 32-bit lanes with one byte
 * shuffle, a variable shift and (unless the lookup ignores the high bits anyway) a mask.  A table of E
 * entries is looked up with vpermps (E = 16), vpermt2ps (32), or 2 / 4 vpermt2ps and blends on index
 * bits 5 and 6 (64, 128); one FMA per component accumulates 16 positions.  No gather and no per-vector
 * scalar decode.  Measured on 8192x2048, one thread: vq-v4-k16-16-o2-g8 7.5 ms (the AVX2 gather
 * kernel) -> 0.56 ms. */
#define VQL_TABF 16384 /* floats of transposed tables on the stack (64 KiB) */

/* tab[i*E + j] = book[j*V + i] for j < k, 0 beyond (so that any index < E reads a finite value) */
static void vql_tables(const float *book, int64_t k, int64_t V, int64_t E, float *tab) {
    for (int64_t i = 0; i < V; i++)
        for (int64_t j = 0; j < E; j++) tab[i * E + j] = j < k ? book[j * V + i] : 0.f;
}

/* one packed stream over a row segment: byte pointer, the shuffle control and shifts that put element
 * j (bits off + j*w ...) of a 16-byte window at the bottom of 32-bit lane j, the mask, and whether the
 * 16-byte load of every full step stays inside the stream */
typedef struct {
    const uint8_t *p;
    __m512i ctrl, sh, msk;
    int off, w, safe;
    __mmask16 lm;
} vql_stream;

/* cs[off] and cs[8 + off] (off = 0..7): the shuffle control and shifts of width w (<= 9) at bit offset
 * off.  An element spans at most 2 bytes (shift + w <= 16); the other two bytes of its lane are zeroed
 * (control 0x80), so that no control byte points past the 16-byte window. */
static void vql_ctrls(int w, __m512i *cs) {
    const __m512i j = _mm512_set_epi32(15, 14, 13, 12, 11, 10, 9, 8, 7, 6, 5, 4, 3, 2, 1, 0);
    for (int off = 0; off < 8; off++) {
        const __m512i b = _mm512_add_epi32(_mm512_set1_epi32(off), _mm512_mullo_epi32(j, _mm512_set1_epi32(w)));
        cs[8 + off] = _mm512_and_si512(b, _mm512_set1_epi32(7));
        cs[off] = _mm512_add_epi32(_mm512_mullo_epi32(_mm512_srli_epi32(b, 3), _mm512_set1_epi32(0x0101)),
                                   _mm512_set1_epi32((int)0x80800100u));
    }
}

AI void vql_open(vql_stream *st, const uint8_t *s, uint64_t nbytes, uint64_t e0, uint64_t e1, int w,
                 const __m512i *cs) {
    const uint64_t bit = e0 * (uint64_t)w;
    st->p = s + (bit >> 3);
    st->w = w;
    st->off = (int)(bit & 7);
    st->ctrl = cs[st->off];
    st->sh = cs[8 + st->off];
    st->msk = _mm512_set1_epi32((1 << w) - 1);
    /* the last full step starts at element e1 - 16 or before: its window ends before byte
       ((e1 - 16) * w >> 3) + 16 */
    st->safe = e1 < e0 + 16 || (((e1 - 16) * (uint64_t)w) >> 3) + 16 <= nbytes;
    st->lm = (__mmask16)((1u << ((st->off + 16 * w + 7) >> 3)) - 1u);
}

/* NM: the lookup reads only the w low bits of an index (w = log2 E) */
AI __m512i vql_spread(const vql_stream *st, __m512i win, const int NM) {
    const __m512i v = _mm512_srlv_epi32(_mm512_shuffle_epi8(win, st->ctrl), st->sh);
    return NM ? v : _mm512_and_si512(v, st->msk);
}

/* the next 16 elements; the 16-byte window is broadcast to the four 128-bit lanes by the load itself
 * (vbroadcasti32x4 m128: no shuffle) where it stays inside the stream */
AI __m512i vql_next(vql_stream *st, const int NM) {
    const __m512i win = st->safe ? _mm512_broadcast_i32x4(_mm_loadu_si128((const __m128i *)st->p))
                                 : _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(st->lm, st->p));
    st->p += 2 * st->w;
    return vql_spread(st, win, NM);
}

/* the n < 16 remaining elements: only the bytes they occupy are read */
AI __m512i vql_tail(const vql_stream *st, int64_t n, const int NM) {
    const __mmask16 lm = (__mmask16)((1u << ((st->off + n * st->w + 7) >> 3)) - 1u);
    return vql_spread(st, _mm512_broadcast_i32x4(_mm_maskz_loadu_epi8(lm, st->p)), NM);
}

/* entry ix of the E-entry table t (E/16 zmm) */
AI __m512 vql_look(const float *t, __m512i ix, const int E) {
    if (E == 16) return _mm512_permutexvar_ps(ix, _mm512_load_ps(t));
    const __m512 a = _mm512_permutex2var_ps(_mm512_load_ps(t), ix, _mm512_load_ps(t + 16));
    if (E == 32) return a;
    const __mmask16 b5 = _mm512_test_epi32_mask(ix, _mm512_set1_epi32(32));
    const __m512 ab = _mm512_mask_blend_ps(b5, a, _mm512_permutex2var_ps(_mm512_load_ps(t + 32), ix,
                                                                         _mm512_load_ps(t + 48)));
    if (E == 64) return ab;
    const __m512 c = _mm512_permutex2var_ps(_mm512_load_ps(t + 64), ix, _mm512_load_ps(t + 80));
    const __m512 cd = _mm512_mask_blend_ps(b5, c, _mm512_permutex2var_ps(_mm512_load_ps(t + 96), ix,
                                                                         _mm512_load_ps(t + 112)));
    return _mm512_mask_blend_ps(_mm512_test_epi32_mask(ix, _mm512_set1_epi32(64)), ab, cd);
}

/* positions [p, pe) of one vector row: acc[i] += xs * (T_i[idx] (+ R_i[ridx])) */
AI void vql_seg(const float *prep, int64_t p, int64_t pe, vql_stream *ms, vql_stream *rs, const float *mt,
                const float *rt, __m512 *acc, const int V, const int RES, const int E, const int NM) {
    for (; p + 16 <= pe; p += 16) {
        const __m512 xv = _mm512_loadu_ps(prep + p);
        const __m512i mi = vql_next(ms, NM);
        const __m512i ri = RES ? vql_next(rs, NM) : mi;
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) {
            __m512 c = vql_look(mt + i * E, mi, E);
            if (RES) c = _mm512_add_ps(c, vql_look(rt + i * E, ri, E));
            acc[i] = _mm512_fmadd_ps(xv, c, acc[i]);
        }
    }
    if (p < pe) {
        const int64_t n = pe - p;
        const __mmask16 m = (__mmask16)((1u << n) - 1u);
        const __m512 xv = _mm512_maskz_loadu_ps(m, prep + p);
        const __m512i mi = vql_tail(ms, n, NM);
        const __m512i ri = RES ? vql_tail(rs, n, NM) : mi;
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) {
            __m512 c = vql_look(mt + i * E, mi, E);
            if (RES) c = _mm512_add_ps(c, vql_look(rt + i * E, ri, E));
            acc[i] = _mm512_mask3_fmadd_ps(xv, c, acc[i], m);
        }
    }
}

/* vector rows [b0, b1), one at a time (two or four rows per pass measured slower: register spills in
 * the per-segment set-up): the outlier positions, then each codebook group */
AI void vql_range(const qg_tensor *t, const float *prep, float *y, int64_t b0, int64_t b1, const float *tabs,
                  const __m512i *cs, const int V, const int RES, const int E, const int NM) {
    const int64_t C = t->C, n_out = t->iparam[3], nc = C - n_out, G = t->iparam[4], gs = t->iparam[5];
    const int kb = t->B, rb = (int)t->iparam[1];
    const uint64_t nb = (uint64_t)(t->R / V);
    const uint64_t mbytes = qg_vq_stream_bytes(nb * C, kb), rbytes = RES ? qg_vq_stream_bytes(nb * nc, rb) : 0;
    const uint8_t *s = (const uint8_t *)t->codes, *rsb = (const uint8_t *)t->aux0;
    const float beta = qg_vq_bias_term(t, prep);
    for (int64_t b = b0; b < b1; b++) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) acc[i] = _mm512_setzero_ps();
        vql_stream ms, rs;
        if (n_out) {
            /* the outlier codebook has k entries: the main index width, so NM holds for it too */
            vql_open(&ms, s, mbytes, b * C, b * C + n_out, kb, cs);
            vql_seg(prep, 0, n_out, &ms, NULL, tabs, NULL, acc, V, 0, E, NM);
        }
        for (int64_t g = 0; g < G; g++) {
            const int64_t p0 = n_out + g * gs, p1 = p0 + gs < C ? p0 + gs : C;
            if (p0 >= p1) break;
            vql_open(&ms, s, mbytes, b * C + p0, b * C + p1, kb, cs);
            if (RES) vql_open(&rs, rsb, rbytes, b * nc + p0 - n_out, b * nc + p1 - n_out, rb, cs + 16);
            const float *mt = tabs + (1 + g) * (RES ? 2 : 1) * V * E;
            vql_seg(prep, p0, p1, &ms, &rs, mt, mt + V * E, acc, V, RES, E, NM);
        }
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) y[b * V + i] = _mm512_reduce_add_ps(acc[i]) + beta;
    }
}

/* 1 if the register-table kernel ran rows [r0, r1) */
static int vql_try(const qg_tensor *t, const float *prep, float *y, int64_t r0, int64_t r1) {
    const int64_t V = t->M, k = t->iparam[0], kr = t->iparam[2], G = t->iparam[4], n_out = t->iparam[3];
    const int RES = kr > 0;
    const int64_t kmax = k > kr ? k : kr;
    if (kmax > 128 || r0 % V || r1 % V) return 0;
    const int E = kmax <= 16 ? 16 : kmax <= 32 ? 32 : kmax <= 64 ? 64 : 128, wl = E == 16 ? 4 : E == 32 ? 5 : E == 64 ? 6 : 7;
    /* 64 or 128 entries cost 3 or 7 operations per lookup: with vectors of 8 or 16 the AVX2 gather
       kernel is as fast (8192x2048 vq-v8-k128: 0.79 ms gather, 1.09 ms tables) */
    if (E > 32 && V > 4) return 0;
    const int64_t per = (RES ? 2 : 1) * V * E;
    if ((1 + G) * per > VQL_TABF) return 0;
    float tabs[VQL_TABF] __attribute__((aligned(64)));
    const qg_vq_side *sd = VQ_SIDE(t);
    if (n_out) vql_tables(sd->obook, k, V, E, tabs);
    for (int64_t g = 0; g < G; g++) {
        vql_tables(t->codebooks + g * k * V, k, V, E, tabs + (1 + g) * per);
        if (RES) vql_tables(sd->rbooks + g * kr * V, kr, V, E, tabs + (1 + g) * per + V * E);
    }
    __m512i cs[32];
    vql_ctrls(t->B, cs);
    if (RES) vql_ctrls((int)t->iparam[1], cs + 16);
    const int NM = t->B == wl && (!RES || t->iparam[1] == wl);
    const int64_t b0 = r0 / V, b1 = r1 / V;
#define VQL_NM(VV, R_, E_)                                                                           \
    if (NM) vql_range(t, prep, y, b0, b1, tabs, cs, VV, R_, E_, 1);                                   \
    else vql_range(t, prep, y, b0, b1, tabs, cs, VV, R_, E_, 0);
#define VQL_E(VV, R_)                                                                                \
    switch (E) {                                                                                     \
    case 16: VQL_NM(VV, R_, 16) break;                                                               \
    case 32: VQL_NM(VV, R_, 32) break;                                                               \
    case 64: VQL_NM(VV, R_, 64) break;                                                               \
    default: VQL_NM(VV, R_, 128) break;                                                              \
    }
#define VQL_CASE(VV)                                                                                 \
    case VV:                                                                                         \
        if (RES) { VQL_E(VV, 1) } else { VQL_E(VV, 0) }                                              \
        return 1;
    switch (V) {
    VQL_CASE(2)
    VQL_CASE(4)
    VQL_CASE(8)
    VQL_CASE(16)
    default: return 0;
    }
#undef VQL_CASE
#undef VQL_E
#undef VQL_NM
}

/* matvec: small codebooks the register-table kernel above; otherwise the AVX2 kernels (measured on
 * 4096x11008, one thread: four 256-bit vector rows per pass beat one 512-bit row for v=16, 1.9 against
 * 2.6 ms; 2.5 against 3.9 ms with a residual stream). */
void qg_vq_vec_rows_avx512(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1) {
    if (!vql_try(t, prep, y, r0, r1)) qg_vq_vec_rows_avx2(t, x, prep, y, r0, r1);
}

/* dequantize: v = 16 in one lane (add, multiply, add: exact), else the AVX2 path */
void qg_vq_dequantize_rows_avx512(const qg_tensor *t, int64_t r0, int64_t r1, float *out) {
    const int64_t v = t->M, C = t->C, n_out = t->iparam[3], nc = C - n_out, k = t->iparam[0];
    const int64_t kr = t->iparam[2], gs = t->iparam[5];
    const int rbits = (int)t->iparam[1];
    if (v != 16) { qg_vq_dequantize_rows_avx2(t, r0, r1, out); return; }
    const qg_vq_side *sd = VQ_SIDE(t);
    const uint8_t *s = (const uint8_t *)t->codes, *rs = (const uint8_t *)t->aux0;
    float q[16] __attribute__((aligned(64)));
    for (int64_t b = r0 / v; b * v < r1; b++) {
        const int64_t i0 = b * v < r0 ? r0 - b * v : 0;
        const int64_t i1 = b * v + v > r1 ? r1 - b * v : v;
        for (int64_t p = 0; p < C; p++) {
            const uint32_t ix = qg_vq_get(s, b * C + p, t->B);
            __m512 c;
            if (p < n_out) c = _mm512_loadu_ps(sd->obook + (int64_t)ix * v);
            else {
                const int64_t g = (p - n_out) / gs;
                c = _mm512_loadu_ps(t->codebooks + (g * k + ix) * v);
                if (rbits)
                    c = _mm512_add_ps(c, _mm512_loadu_ps(sd->rbooks +
                                         (g * kr + qg_vq_get(rs, b * nc + p - n_out, rbits)) * v));
            }
            c = _mm512_add_ps(_mm512_mul_ps(c, _mm512_set1_ps(t->scales[p])), _mm512_set1_ps(sd->colbias[p]));
            _mm512_store_ps(q, c);
            float *o = out + (b * v - r0) * C + sd->perm[p];
            for (int64_t i = i0; i < i1; i++) o[i * C] = q[i];
        }
    }
}

#include "qg_target_end.h"
#endif

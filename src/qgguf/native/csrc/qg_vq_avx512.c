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

/* ---- 4-bit indices (k = 16, kr = 16 or none: the 2-bit `--bits 2` configurations such as vq-v4-k16-16-o2-g8) ----
 * On Zen 5 a 128-bit broadcast load (vbroadcasti32x4), vpshufb, a masked merge and a broadcast from a general
 * register all take the two shuffle pipes that the table lookups (vpermps) need, so the general decode above costs
 * 2 + 2 shuffle slots per 16 positions besides the 8 lookups (v = 4 with a residual).  Here 16 nibbles reach their
 * 32-bit lanes through 64-bit broadcast loads from memory (load pipes only) and shifts: element q goes to dword 2q
 * and element q + 8 to dword 2q + 1 of a qword lane shifted right by 4h + 4q (h: the nibble offset of the first
 * element; the lookup reads the low 4 bits of a lane, so no mask).  With VBMI2 that is one vpshrdvq of the 128 bits
 * at the block's first byte (reads 16 bytes); otherwise the qword 2 bytes further on is merged into qword lanes 4-7
 * and one vpsrlvq shifts (reads 10 bytes).
 * The prepared input follows that lane order: prepare stores each full 16-position block of a segment (the outlier
 * columns, each codebook group) as xs[a+0], xs[a+8], xs[a+1], xs[a+9], ..., xs[a+7], xs[a+15], and each segment's
 * last partial block once more, in lane order with zeros past the segment's end, after the bias partial sums (the
 * decoded indices past the end are valid table entries, multiplied by 0).  Near a stream's end, where a block's
 * read would pass the 3 padding bytes, the partial block goes through the general kernel's tail step, which reads
 * the positions in order from xs[p].
 * Measured on 8192x2048, one thread (Zen 5, warm caches): vq-v4-k16-16-o2-g8 0.60 ms (general kernel) -> 0.42 ms. */

/* slot l of a full block holds position a + vqn_lane_j[l] */
static const int32_t vqn_lane_j[16] __attribute__((aligned(64))) = {0, 8, 1, 9, 2, 10, 3, 11,
                                                                     4, 12, 5, 13, 6, 14, 7, 15};

/* 1 if the tensor runs the 4-bit kernel (prepare and vec_rows must agree: the prep layout differs) */
static int vqn_applies(const qg_tensor *t) {
    const int64_t V = t->M, G = t->iparam[4];
    const int RES = t->iparam[2] > 0;
    if (t->B != 4 || (RES && t->iparam[1] != 4)) return 0;
    if (V != 2 && V != 4 && V != 8 && V != 16) return 0;
    return (1 + G) * (RES ? 2 : 1) * V * 16 <= VQL_TABF;
}

/* segment sg of the position axis: -1 the outlier columns, else codebook group sg; [*a, *e), empty if *a >= *e */
static inline void vqn_segment(const qg_tensor *t, int64_t sg, int64_t *a, int64_t *e) {
    const int64_t C = t->C, n_out = t->iparam[3], gs = t->iparam[5];
    if (sg < 0) { *a = 0; *e = n_out; return; }
    *a = n_out + sg * gs;
    *e = *a + gs < C ? *a + gs : C;
}

/* floats of prep: xs and the bias partial sums (qg_vq_prep_size), then 16 per segment for the tail blocks */
int64_t qg_vq_prep_size_avx512(const qg_tensor *t) {
    return qg_vq_prep_size(t) + (vqn_applies(t) ? 16 * (1 + t->iparam[4]) : 0);
}

/* prep for columns [j0*g, j1*g): the full blocks and tail blocks that start there (a block belongs to the tile of
 * its first position, and may end past it) and the tail positions there (in order); the bias partial sums the
 * positions of those full blocks and the tail positions in the range, so every position is counted once */
static void vqn_prepare(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1) {
    const qg_vq_side *sd = VQ_SIDE(t);
    const int64_t G = t->iparam[4], s0 = j0 * t->g, s1 = j1 * t->g;
    float *tails = prep + qg_vq_prep_size(t);
    const __m512i lj = _mm512_load_si512(vqn_lane_j);
    __m512 bacc = _mm512_setzero_ps();
    float bs = 0.f;
    for (int64_t sg = -1; sg < G; sg++) {
        int64_t a, e;
        vqn_segment(t, sg, &a, &e);
        if (a >= e || a >= s1 || e <= s0) continue;
        const int64_t nfull = (e - a) / 16, ta = a + 16 * nfull;
        int64_t kb0 = s0 > a ? (s0 - a + 15) / 16 : 0, kb1 = (s1 - a + 15) / 16;
        if (kb1 > nfull) kb1 = nfull;
        for (int64_t kb = kb0; kb < kb1; kb++) {
            const int64_t base = a + 16 * kb;
            const __m512 xg = _mm512_i32gather_ps(_mm512_loadu_si512(sd->perm + base), x, 4);
            bacc = _mm512_add_ps(bacc, _mm512_mul_ps(xg, _mm512_loadu_ps(sd->colbias + base)));
            const __m512 xs = _mm512_mul_ps(xg, _mm512_loadu_ps(t->scales + base));
            _mm512_storeu_ps(prep + base, _mm512_permutexvar_ps(lj, xs));
        }
        const int64_t p0 = ta > s0 ? ta : s0, p1 = e < s1 ? e : s1;
        for (int64_t p = p0; p < p1; p++) {
            const float xv = x[sd->perm[p]];
            prep[p] = xv * t->scales[p];
            bs += xv * sd->colbias[p];
        }
        if (ta < e && ta >= s0 && ta < s1)
            for (int l = 0; l < 16; l++) {
                const int64_t p = ta + vqn_lane_j[l];
                tails[16 * (sg + 1) + l] = p < e ? x[sd->perm[p]] * t->scales[p] : 0.f;
            }
    }
    prep[t->C + j0 / QG_JTILE] = _mm512_reduce_add_ps(bacc) + bs;
}

void qg_vq_prepare_avx512(const qg_tensor *t, const float *x, float *prep, int64_t j0, int64_t j1) {
    if (vqn_applies(t)) vqn_prepare(t, x, prep, j0, j1);
    else qg_vq_prepare_avx2(t, x, prep, j0, j1);
}

/* a 64-bit broadcast straight from memory (vpbroadcastq zmm, m64: load pipes only); compilers otherwise merge
 * overlapping loads into a general register and broadcast from there, which takes a shuffle-pipe slot */
AI __m512i vqn_bcast64(const uint8_t *p) {
    __m512i r;
    __asm__("vpbroadcastq %1, %0" : "=v"(r) : "m"(*(const uint64_t *)(const void *)p));
    return r;
}

/* the 16 nibbles of a block starting at stream byte p (reads p .. p + 9); sh: 4h + 4q, minus 16 in lanes 4-7 */
AI __m512i vqn_narrow(const uint8_t *p, __m512i sh) {
    return _mm512_srlv_epi64(_mm512_mask_mov_epi64(vqn_bcast64(p), 0xF0, vqn_bcast64(p + 2)), sh);
}

#define QG_TARGET_VBMI2 QG_TARGET ",avx512vbmi2"
/* the same with VBMI2 (reads p .. p + 15); sh: 4h + 4q */
static inline __attribute__((always_inline, target(QG_TARGET_VBMI2))) __m512i vqn_wide(const uint8_t *p, __m512i sh) {
    return _mm512_shrdv_epi64(vqn_bcast64(p), vqn_bcast64(p + 8), sh);
}

/* n full blocks from xs, then (tx != NULL) one partial block whose lane-order xs is tx, indices from stream bytes mp
 * (and rp), 8 bytes per block: acc[i] += xs * (T_i[idx] (+ R_i[ridx])).  Two accumulator sets (even and odd
 * blocks): one FMA chain per component would bound a block at the FMA latency. */
#define VQN_BLOCKS_BODY(NEXT)                                                                        \
    __m512 A0[16], A1[16], TM[16], TR[16];                                                           \
    _Pragma("GCC unroll 16")                                                                         \
    for (int i = 0; i < V; i++) {                                                                    \
        A0[i] = acc[i]; A1[i] = _mm512_setzero_ps(); TM[i] = _mm512_load_ps(mt + 16 * i);            \
        if (RES) TR[i] = _mm512_load_ps(rt + 16 * i);                                                \
    }                                                                                                \
    int64_t j = 0;                                                                                   \
    for (; j + 2 <= n; j += 2, xs += 32, mp += 16, rp += RES ? 16 : 0) {                            \
        const __m512 x0 = _mm512_loadu_ps(xs), x1 = _mm512_loadu_ps(xs + 16);                       \
        const __m512i m0 = NEXT(mp, msh), m1 = NEXT(mp + 8, msh);                                    \
        const __m512i r0 = RES ? NEXT(rp, rsh) : m0, r1 = RES ? NEXT(rp + 8, rsh) : m1;              \
        _Pragma("GCC unroll 16")                                                                     \
        for (int i = 0; i < V; i++) {                                                                \
            __m512 c0 = _mm512_permutexvar_ps(m0, TM[i]), c1 = _mm512_permutexvar_ps(m1, TM[i]);     \
            if (RES) {                                                                               \
                c0 = _mm512_add_ps(c0, _mm512_permutexvar_ps(r0, TR[i]));                            \
                c1 = _mm512_add_ps(c1, _mm512_permutexvar_ps(r1, TR[i]));                            \
            }                                                                                        \
            A0[i] = _mm512_fmadd_ps(x0, c0, A0[i]);                                                  \
            A1[i] = _mm512_fmadd_ps(x1, c1, A1[i]);                                                  \
        }                                                                                            \
    }                                                                                                \
    for (int last = 0; last < 2; last++) {                                                           \
        if (last ? !tx : j >= n) continue;                                                           \
        const __m512 x0 = _mm512_loadu_ps(last ? tx : xs);                                           \
        const uint8_t *m = last ? mp + 8 * (n - j) : mp, *r = last ? rp + 8 * (n - j) : rp;           \
        const __m512i m0 = NEXT(m, msh);                                                             \
        const __m512i r0 = RES ? NEXT(r, rsh) : m0;                                                  \
        _Pragma("GCC unroll 16")                                                                     \
        for (int i = 0; i < V; i++) {                                                                \
            __m512 c0 = _mm512_permutexvar_ps(m0, TM[i]);                                            \
            if (RES) c0 = _mm512_add_ps(c0, _mm512_permutexvar_ps(r0, TR[i]));                       \
            A1[i] = _mm512_fmadd_ps(x0, c0, A1[i]);                                                  \
        }                                                                                            \
    }                                                                                                \
    _Pragma("GCC unroll 16")                                                                         \
    for (int i = 0; i < V; i++) acc[i] = _mm512_add_ps(A0[i], A1[i]);

#define VQN_BLOCKS_ARGS                                                                              \
    const float *xs, int64_t n, const float *tx, const uint8_t *mp, __m512i msh, const uint8_t *rp, \
        __m512i rsh, const float *mt, const float *rt, __m512 *acc

AI void vqn_blocks_narrow(VQN_BLOCKS_ARGS, const int V, const int RES) {
    VQN_BLOCKS_BODY(vqn_narrow)
}

/* the VBMI2 instances, one per (V, RES), called once per segment */
#define VQN_WIDE(VV, RR)                                                                             \
    static __attribute__((noinline, target(QG_TARGET_VBMI2))) void vqn_wide_##VV##_##RR(VQN_BLOCKS_ARGS) { \
        const int V = VV, RES = RR;                                                                  \
        (void)rt; (void)rsh;                                                                         \
        VQN_BLOCKS_BODY(vqn_wide)                                                                    \
    }
VQN_WIDE(2, 0) VQN_WIDE(2, 1) VQN_WIDE(4, 0) VQN_WIDE(4, 1)
VQN_WIDE(8, 0) VQN_WIDE(8, 1) VQN_WIDE(16, 0) VQN_WIDE(16, 1)
#undef VQN_WIDE

AI void vqn_blocks_wide(VQN_BLOCKS_ARGS, const int V, const int RES) {
#define VQN_CALL(VV)                                                                                 \
    if (V == VV) {                                                                                   \
        if (RES) vqn_wide_##VV##_1(xs, n, tx, mp, msh, rp, rsh, mt, rt, acc);                        \
        else vqn_wide_##VV##_0(xs, n, tx, mp, msh, rp, rsh, mt, rt, acc);                            \
        return;                                                                                      \
    }
    VQN_CALL(2) VQN_CALL(4) VQN_CALL(8) VQN_CALL(16)
#undef VQN_CALL
}

/* vector rows [b0, b1) into yb[(b - b0) * V + i] */
AI void vqn_range(const qg_tensor *t, const float *prep, float *yb, int64_t b0, int64_t b1, const float *tabs,
                  const __m512i *cs, const int V, const int RES, const int vbmi2) {
    const int64_t C = t->C, n_out = t->iparam[3], nc = C - n_out, G = t->iparam[4];
    const uint64_t nb = (uint64_t)(t->R / V);
    const uint64_t mbytes = qg_vq_stream_bytes(nb * C, 4), rbytes = RES ? qg_vq_stream_bytes(nb * nc, 4) : 0;
    const uint8_t *s = (const uint8_t *)t->codes, *rsb = (const uint8_t *)t->aux0;
    const float *tails = prep + qg_vq_prep_size(t);
    const float beta = qg_vq_bias_term(t, prep);
    /* by the parity h of a block's first element: the wide shifts 4h + 4q, the narrow ones 4h + 4q - 16 [q >= 4] */
    const __m512i q4 = _mm512_set_epi64(28, 24, 20, 16, 12, 8, 4, 0), q4n = _mm512_set_epi64(12, 8, 4, 0, 12, 8, 4, 0);
    const __m512i four = _mm512_set1_epi64(4);
    const __m512i shw[2] = {q4, _mm512_add_epi64(q4, four)}, shn[2] = {q4n, _mm512_add_epi64(q4n, four)};
    for (int64_t b = b0; b < b1; b++) {
        __m512 acc[16];
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) acc[i] = _mm512_setzero_ps();
        for (int64_t sg = -1; sg < G; sg++) {
            int64_t a, e;
            vqn_segment(t, sg, &a, &e);
            if (a >= e) { if (sg < 0) continue; break; }
            const int res = RES && sg >= 0;
            const float *mt = tabs + (sg + 1) * (RES ? 2 : 1) * V * 16, *rt = mt + V * 16;
            const uint64_t me = (uint64_t)(b * C + a), re = res ? (uint64_t)(b * nc + a - n_out) : 0;
            const uint8_t *mp = s + (me >> 1), *rp = res ? rsb + (re >> 1) : NULL;
            const int64_t n = (e - a) / 16, pt = a + 16 * n;
            /* the last block (the partial one if any) starts at stream byte (me >> 1) + 8 * nl */
            const uint64_t nl = pt < e ? (uint64_t)n : (uint64_t)n - 1;
            const int wide = vbmi2 && (me >> 1) + 8 * nl + 16 <= mbytes && (!res || (re >> 1) + 8 * nl + 16 <= rbytes);
            const int narrow = (me >> 1) + 8 * nl + 10 <= mbytes && (!res || (re >> 1) + 8 * nl + 10 <= rbytes);
            const float *tx = pt < e && (wide || narrow) ? tails + 16 * (sg + 1) : NULL;
            if (wide) vqn_blocks_wide(prep + a, n, tx, mp, shw[me & 1], rp, shw[re & 1], mt, rt, acc, V, res);
            else if (res) vqn_blocks_narrow(prep + a, n, tx, mp, shn[me & 1], rp, shn[re & 1], mt, rt, acc, V, 1);
            else vqn_blocks_narrow(prep + a, n, tx, mp, shn[me & 1], rp, shn[re & 1], mt, rt, acc, V, 0);
            if (pt < e && !tx) { /* the partial block at a stream's end, positions in order from xs[pt] */
                vql_stream ms, rs;
                vql_open(&ms, s, mbytes, b * C + pt, b * C + e, 4, cs);
                if (res) {
                    vql_open(&rs, rsb, rbytes, b * nc + pt - n_out, b * nc + e - n_out, 4, cs);
                    vql_seg(prep, pt, e, &ms, &rs, mt, rt, acc, V, 1, 16, 1);
                } else {
                    vql_seg(prep, pt, e, &ms, NULL, mt, NULL, acc, V, 0, 16, 1);
                }
            }
        }
#pragma GCC unroll 16
        for (int i = 0; i < V; i++) yb[(b - b0) * V + i] = _mm512_reduce_add_ps(acc[i]) + beta;
    }
}

/* rows [r0, r1) (any range: partial vector rows are computed whole and the rows outside are dropped) */
static void vqn_rows(const qg_tensor *t, const float *prep, float *y, int64_t r0, int64_t r1) {
    const int64_t V = t->M, k = t->iparam[0], kr = t->iparam[2], G = t->iparam[4], n_out = t->iparam[3];
    const int RES = kr > 0;
    const int64_t per = (RES ? 2 : 1) * V * 16;
    float tabs[VQL_TABF] __attribute__((aligned(64)));
    const qg_vq_side *sd = VQ_SIDE(t);
    if (n_out) vql_tables(sd->obook, k, V, 16, tabs);
    for (int64_t g = 0; g < G; g++) {
        vql_tables(t->codebooks + g * k * V, k, V, 16, tabs + (1 + g) * per);
        if (RES) vql_tables(sd->rbooks + g * kr * V, kr, V, 16, tabs + (1 + g) * per + V * 16);
    }
    __m512i cs[16];
    vql_ctrls(4, cs);
    const int vbmi2 = __builtin_cpu_supports("avx512vbmi2");
    int64_t b0 = r0 / V, b1 = (r1 + V - 1) / V;
    float part[16];
#define VQN_RUN(VV)                                                                                  \
    do {                                                                                             \
        if (RES) vqn_range(t, prep, yb, bb0, bb1, tabs, cs, VV, 1, vbmi2);                           \
        else vqn_range(t, prep, yb, bb0, bb1, tabs, cs, VV, 0, vbmi2);                               \
    } while (0)
#define VQN_DISPATCH()                                                                               \
    switch (V) {                                                                                     \
    case 2: VQN_RUN(2); break;                                                                       \
    case 4: VQN_RUN(4); break;                                                                       \
    case 8: VQN_RUN(8); break;                                                                       \
    default: VQN_RUN(16); break;                                                                     \
    }
    /* a partial first / last vector row through a small buffer */
    if (r0 % V) {
        float *yb = part;
        const int64_t bb0 = b0, bb1 = b0 + 1;
        VQN_DISPATCH()
        for (int64_t r = r0; r < (b0 + 1) * V && r < r1; r++) y[r] = part[r - b0 * V];
        b0++;
    }
    if (b0 < b1 && r1 % V) {
        float *yb = part;
        const int64_t bb0 = b1 - 1, bb1 = b1;
        VQN_DISPATCH()
        for (int64_t r = (b1 - 1) * V; r < r1; r++) y[r] = part[r - (b1 - 1) * V];
        b1--;
    }
    if (b0 < b1) {
        float *yb = y + b0 * V;
        const int64_t bb0 = b0, bb1 = b1;
        VQN_DISPATCH()
    }
#undef VQN_DISPATCH
#undef VQN_RUN
}

/* matvec: small codebooks the register-table kernel above; otherwise the AVX2 kernels (measured on
 * 4096x11008, one thread: four 256-bit vector rows per pass beat one 512-bit row for v=16, 1.9 against
 * 2.6 ms; 2.5 against 3.9 ms with a residual stream). */
void qg_vq_vec_rows_avx512(const qg_tensor *t, const float *x, const float *prep, float *y,
                           int64_t r0, int64_t r1) {
    if (vqn_applies(t)) vqn_rows(t, prep, y, r0, r1);
    else if (!vql_try(t, prep, y, r0, r1)) qg_vq_vec_rows_avx2(t, x, prep, y, r0, r1);
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

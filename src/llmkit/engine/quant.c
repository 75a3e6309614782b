/* Matrix products with weights kept in GGUF block formats (llmkit.engine.quant).
 *
 * W is [N, K] in one of the block formats below; K is a whole number of blocks. W is repacked
 * once (llmkit_pack: rows in groups of 8, see "the packed layout") and then y[m, n] =
 * sum_k x[m, k] * W[n, k] is computed without unpacking W to memory. The activations x are first
 * quantized per block of 32 to int8 with one float scale (d = max|x| / 127, q = round half to even
 * of x * 127 / max|x|), keeping each block's d * sum(q) and the integer sums of each 16: weight
 * blocks are multiplied in integers and scaled once per block (per sub-block for the K formats).
 *
 * Paths: AVX2 (+FMA, F16C) with maddubs; VNNI dot products (AVX512-VNNI or AVX-VNNI, 256-bit) where
 * the compiler targets them; portable C everywhere else (LLMKIT_SCALAR forces it, for tests).
 * Dequantization must round exactly as the reference does: build with -ffp-contract=off (the SIMD
 * paths use explicit fused multiply-adds where they want them).
 */
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#include <math.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#if defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && !defined(LLMKIT_SCALAR)
#define USE_AVX2 1
#include <immintrin.h>
#if defined(LLMKIT_EMULATE_VNNI)
/* Tests: the VNNI code paths on a machine without VNNI, with its dot product computed exactly in
 * AVX2 (4 products of unsigned and signed bytes added to each int32 lane, no saturation). */
static inline __m256i dpbusd_emulated(__m256i acc, __m256i u, __m256i s) {
    __m256i ue = _mm256_and_si256(u, _mm256_set1_epi16(0xff)), uo = _mm256_srli_epi16(u, 8);
    __m256i se = _mm256_srai_epi16(_mm256_slli_epi16(s, 8), 8), so = _mm256_srai_epi16(s, 8);
    return _mm256_add_epi32(acc, _mm256_add_epi32(_mm256_madd_epi16(ue, se), _mm256_madd_epi16(uo, so)));
}
#define DPBUSD(acc, u, s) dpbusd_emulated((acc), (u), (s))
#elif defined(__AVX512VNNI__) && defined(__AVX512VL__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_epi32((acc), (u), (s))
#elif defined(__AVXVNNI__)
#define DPBUSD(acc, u, s) _mm256_dpbusd_avx_epi32((acc), (u), (s))
#endif
#endif

enum { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q4_K = 12, Q5_K = 13, Q6_K = 14 };

int llmkit_block_elems(int t) { return t >= Q4_K ? 256 : 32; }

int llmkit_block_bytes(int t) {
    switch (t) {
    case Q4_0: return 18;  case Q4_1: return 20;  case Q5_0: return 22;  case Q5_1: return 24;
    case Q8_0: return 34;  case Q4_K: return 144; case Q5_K: return 176; case Q6_K: return 210;
    default: return 0;
    }
}

/* Which SIMD path this build took: 0 portable, 1 AVX2, 2 AVX2 with VNNI dot products, 3 the
 * same with VNNI emulated (tests). */
int llmkit_simd_level(void) {
#if defined(USE_AVX2) && defined(LLMKIT_EMULATE_VNNI)
    return 3;
#elif defined(USE_AVX2) && defined(DPBUSD)
    return 2;
#elif defined(USE_AVX2)
    return 1;
#else
    return 0;
#endif
}

/* ------------------------------------------------------------------ half, bfloat16 */

static inline float f16(const uint8_t* p) {
    uint16_t h; memcpy(&h, p, 2);
#ifdef USE_AVX2
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, e = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
    if (e == 0) {  /* zero or subnormal: man * 2^-24, exact in float */
        float v = (float)man * 0x1p-24f;
        return sign ? -v : v;
    }
    bits = e == 0x1f ? sign | 0x7f800000u | (man << 13) : sign | ((e + 112) << 23) | (man << 13);
    float f; memcpy(&f, &bits, 4);
    return f;
#endif
}

static inline uint16_t to_f16(float f) {  /* round to nearest even, as numpy's astype(float16) */
#ifdef USE_AVX2
    return _cvtss_sh(f, _MM_FROUND_TO_NEAREST_INT);
#else
    uint32_t x; memcpy(&x, &f, 4);
    uint32_t sign = (x >> 16) & 0x8000, ax = x & 0x7fffffffu;
    if (ax > 0x7f800000u) return (uint16_t)(sign | 0x7e00);      /* NaN */
    if (ax >= 0x477ff000u) return (uint16_t)(sign | 0x7c00);     /* rounds past 65504: infinity */
    if (ax < 0x38800000u) {                                        /* below 2^-14: subnormal half */
        float a; memcpy(&a, &ax, 4);
        return (uint16_t)(sign | (uint32_t)lrintf(a * 0x1p24f));
    }
    uint32_t r = ax - 0x38000000u;
    r += 0xfffu + ((r >> 13) & 1u);
    return (uint16_t)(sign | (r >> 13));
#endif
}

static inline float from_bf16(uint16_t x) { uint32_t u = (uint32_t)x << 16; float f; memcpy(&f, &u, 4); return f; }

static inline uint16_t to_bf16(float f) {
    uint32_t u; memcpy(&u, &f, 4);
    if ((u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((u + 0x7fffu + ((u >> 16) & 1u)) >> 16);
}

/* ------------------------------------------------------------------ unpacking, portable
 * Every format is unpacked to integers q and, per 16 values, a factor f and an offset o, with
 * weight = f * q + o (o only for the formats that have one: has_offset). */

static inline void k_scale_min(const uint8_t* s, int j, int* sc, int* m) {
    if (j < 4) { *sc = s[j] & 63; *m = s[j + 4] & 63; }
    else { *sc = (s[j + 4] & 0xF) | ((s[j - 4] >> 6) << 4); *m = (s[j + 4] >> 4) | ((s[j] >> 6) << 4); }
}

static int has_offset(int t) { return t == Q4_1 || t == Q5_1 || t == Q4_K || t == Q5_K; }

static void unpack(int t, const uint8_t* b, int8_t* q, float* f, float* o) {
    switch (t) {
    case Q4_0: case Q4_1: case Q5_0: case Q5_1: {
        int hi = t == Q5_0 || t == Q5_1, off = t == Q4_1 || t == Q5_1;
        const uint8_t* qs = b + 2 + 2 * off + 4 * hi;
        uint32_t qh = 0;
        if (hi) memcpy(&qh, b + 2 + 2 * off, 4);
        int bias = off ? 0 : (hi ? 16 : 8);
        for (int j = 0; j < 16; j++) {
            q[j] = (int8_t)(((qs[j] & 15) | (((qh >> j) & 1) << 4)) - bias);
            q[j + 16] = (int8_t)(((qs[j] >> 4) | (((qh >> (j + 16)) & 1) << 4)) - bias);
        }
        f[0] = f[1] = f16(b);
        o[0] = o[1] = off ? f16(b + 2) : 0.0f;
        break;
    }
    case Q8_0:
        memcpy(q, b + 2, 32);
        f[0] = f[1] = f16(b);
        o[0] = o[1] = 0.0f;
        break;
    case Q4_K: case Q5_K: {
        float d = f16(b), dmin = f16(b + 2);
        const uint8_t* qh = b + 16;
        const uint8_t* qs = b + (t == Q5_K ? 48 : 16);
        for (int j = 0; j < 8; j++) {
            int sc, m;
            k_scale_min(b + 4, j, &sc, &m);
            f[2 * j] = f[2 * j + 1] = d * (float)sc;
            o[2 * j] = o[2 * j + 1] = -(dmin * (float)m);
            const uint8_t* c = qs + (j / 2) * 32;
            for (int l = 0; l < 32; l++) {
                int v = j & 1 ? c[l] >> 4 : c[l] & 15;
                if (t == Q5_K) v |= ((qh[l] >> j) & 1) << 4;
                q[32 * j + l] = (int8_t)v;
            }
        }
        break;
    }
    case Q6_K: {
        const uint8_t *ql = b, *qh = b + 128;
        const int8_t* sc = (const int8_t*)(b + 192);
        float d = f16(b + 208);
        for (int i = 0; i < 16; i++) { f[i] = d * (float)sc[i]; o[i] = 0.0f; }
        for (int h = 0; h < 2; h++)
            for (int l = 0; l < 32; l++) {
                const uint8_t *a = ql + 64 * h, *hb = qh + 32 * h;
                int8_t* y = q + 128 * h;
                y[l] = (int8_t)(((a[l] & 15) | ((hb[l] & 3) << 4)) - 32);
                y[l + 32] = (int8_t)(((a[l + 32] & 15) | (((hb[l] >> 2) & 3) << 4)) - 32);
                y[l + 64] = (int8_t)(((a[l] >> 4) | (((hb[l] >> 4) & 3) << 4)) - 32);
                y[l + 96] = (int8_t)(((a[l + 32] >> 4) | (((hb[l] >> 6) & 3) << 4)) - 32);
            }
        break;
    }
    }
}

/* One block as float32 or bfloat16: f * q (+ o), the same float operations, in the same order,
 * as the gguf package's reference dequantization, so the results agree bit for bit. */
static void dequant_block(int t, const uint8_t* blk, float* outf, uint16_t* outb) {
    int E = llmkit_block_elems(t), off = has_offset(t);
    int8_t q[256]; float f[16], o[16], y[256];
    unpack(t, blk, q, f, o);
    if (off) for (int i = 0; i < E; i++) y[i] = f[i / 16] * (float)q[i] + o[i / 16];
    else for (int i = 0; i < E; i++) y[i] = f[i / 16] * (float)q[i];
    if (outf) memcpy(outf, y, sizeof(float) * E);
    else for (int i = 0; i < E; i++) outb[i] = to_bf16(y[i]);
}

/* ------------------------------------------------------------------ the packed layout
 * For the products, W is repacked once: rows in groups of 8 (the last group padded with zero
 * rows), and for each group the 8 rows' blocks b side by side in one "group block", so that one
 * 256-bit vector holds 4 consecutive values of each of the 8 rows and every SIMD lane works for one
 * output row: no horizontal sums, and each block's scales for 8 rows load as one vector. Fields of
 * a block (fixed per format): SCALAR (d, m, qh: stored [row][bytes]), QUADS (quantized values:
 * stored in 4-byte pieces, [piece][row][4]), BYTES_T (Q6_K scales: [byte][row]) and KSCALES (the
 * 12 bytes of 6-bit K scales and mins, stored decoded, [sub-block][row] bytes: 128 for 96). */

enum { F_SCALAR, F_QUADS, F_BYTES_T, F_KSCALES };
typedef struct { short off, size, kind; } Field;

static const Field F_Q4_0[] = {{0, 2, F_SCALAR}, {2, 16, F_QUADS}};
static const Field F_Q4_1[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 16, F_QUADS}};
static const Field F_Q5_0[] = {{0, 2, F_SCALAR}, {2, 4, F_SCALAR}, {6, 16, F_QUADS}};
static const Field F_Q5_1[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 4, F_SCALAR}, {8, 16, F_QUADS}};
static const Field F_Q8_0[] = {{0, 2, F_SCALAR}, {2, 32, F_QUADS}};
static const Field F_Q4_K[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 12, F_KSCALES}, {16, 128, F_QUADS}};
static const Field F_Q5_K[] = {{0, 2, F_SCALAR}, {2, 2, F_SCALAR}, {4, 12, F_KSCALES}, {16, 32, F_QUADS}, {48, 128, F_QUADS}};
/* Q6_K's halves of 128 values each as high bits, then low bits: the order in which the kernel first
 * reads them, so that a product walks its weights front to back. (Stored as in the file, low bits
 * of both halves then high bits of both, the product read memory markedly slower.) */
static const Field F_Q6_K[] = {{208, 2, F_SCALAR}, {192, 16, F_BYTES_T}, {128, 32, F_QUADS}, {0, 64, F_QUADS}, {160, 32, F_QUADS}, {64, 64, F_QUADS}};

static const Field* fields(int t, int* n) {
#define RET(F) { *n = (int)(sizeof(F) / sizeof(F[0])); return F; }
    switch (t) {
    case Q4_0: RET(F_Q4_0) case Q4_1: RET(F_Q4_1) case Q5_0: RET(F_Q5_0) case Q5_1: RET(F_Q5_1)
    case Q8_0: RET(F_Q8_0) case Q4_K: RET(F_Q4_K) case Q5_K: RET(F_Q5_K) default: RET(F_Q6_K)
    }
#undef RET
}

int llmkit_group_bytes(int t) {
    return 8 * llmkit_block_bytes(t) + (t == Q4_K || t == Q5_K ? 32 : 0);
}

/* Block b of row r <-> its place in group block gb. */
static void put_block(int t, const uint8_t* src, int r, uint8_t* gb) {
    int n, go = 0;
    const Field* f = fields(t, &n);
    for (int i = 0; i < n; i++) {
        const uint8_t* s = src + f[i].off;
        int z = f[i].size;
        if (f[i].kind == F_SCALAR) memcpy(gb + go + z * r, s, z);
        else if (f[i].kind == F_QUADS) for (int k = 0; k < z / 4; k++) memcpy(gb + go + 32 * k + 4 * r, s + 4 * k, 4);
        else if (f[i].kind == F_BYTES_T) for (int k = 0; k < z; k++) gb[go + 8 * k + r] = s[k];
        else for (int j = 0; j < 8; j++) { int sc, m; k_scale_min(s, j, &sc, &m); gb[go + 8 * j + r] = (uint8_t)sc; gb[go + 64 + 8 * j + r] = (uint8_t)m; }
        go += f[i].kind == F_KSCALES ? 128 : 8 * z;
    }
}

static void get_block(int t, const uint8_t* gb, int r, uint8_t* dst) {
    int n, go = 0;
    const Field* f = fields(t, &n);
    for (int i = 0; i < n; i++) {
        uint8_t* d = dst + f[i].off;
        int z = f[i].size;
        if (f[i].kind == F_SCALAR) memcpy(d, gb + go + z * r, z);
        else if (f[i].kind == F_QUADS) for (int k = 0; k < z / 4; k++) memcpy(d + 4 * k, gb + go + 32 * k + 4 * r, 4);
        else if (f[i].kind == F_BYTES_T) for (int k = 0; k < z; k++) d[k] = gb[go + 8 * k + r];
        else {
            uint8_t sc[8], m[8];
            for (int j = 0; j < 8; j++) { sc[j] = gb[go + 8 * j + r]; m[j] = gb[go + 64 + 8 * j + r]; }
            for (int j = 0; j < 4; j++) {
                d[j] = (uint8_t)(sc[j] | ((sc[j + 4] >> 4) << 6));
                d[j + 4] = (uint8_t)(m[j] | ((m[j + 4] >> 4) << 6));
                d[j + 8] = (uint8_t)((sc[j + 4] & 15) | ((m[j + 4] & 15) << 4));
            }
        }
        go += f[i].kind == F_KSCALES ? 128 : 8 * z;
    }
}

/* W [N, K] as stored in GGUF -> the packed layout, ceil(N / 8) groups. */
void llmkit_pack(int t, const uint8_t* src, int64_t N, int64_t K, uint8_t* dst, int nthreads) {
    int64_t nb = K / llmkit_block_elems(t), B = llmkit_block_bytes(t), GB = llmkit_group_bytes(t);
    int64_t groups = (N + 7) / 8;
    #pragma omp parallel for num_threads(nthreads) schedule(static) if (N * K > 1000000)
    for (int64_t g = 0; g < groups; g++) {
        uint8_t zero[256] = {0};
        for (int64_t b = 0; b < nb; b++)
            for (int r = 0; r < 8; r++) {
                int64_t row = g * 8 + r;
                put_block(t, row < N ? src + (row * nb + b) * B : zero, r, dst + (g * nb + b) * GB);
            }
    }
}

static void dequant_row_packed(int t, const uint8_t* w, int64_t K, int64_t row, void* out, int out_bf16) {
    int64_t E = llmkit_block_elems(t), nb = K / E, GB = llmkit_group_bytes(t);
    uint8_t blk[256];
    for (int64_t b = 0; b < nb; b++) {
        get_block(t, w + ((row / 8) * nb + b) * GB, (int)(row % 8), blk);
        if (out_bf16) dequant_block(t, blk, NULL, (uint16_t*)out + b * E);
        else dequant_block(t, blk, (float*)out + b * E, NULL);
    }
}

/* Rows ids[0..n-1] (or 0..n-1 when ids is NULL) of packed W, dequantized into out [n, K]. A few
 * rows (an embedding lookup) run without a parallel region: switching libgomp's team between one
 * thread and several costs more than they do. */
void llmkit_dequantize(int t, const uint8_t* w, int64_t K, const int64_t* ids, int64_t n, void* out,
                       int out_bf16, int nthreads) {
    int64_t size = out_bf16 ? 2 : 4;
    if (n * K <= 65536 || nthreads <= 1) {
        for (int64_t i = 0; i < n; i++) dequant_row_packed(t, w, K, ids ? ids[i] : i, (char*)out + i * K * size, out_bf16);
        return;
    }
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < n; i++) dequant_row_packed(t, w, K, ids ? ids[i] : i, (char*)out + i * K * size, out_bf16);
}

/* ------------------------------------------------------------------ activations
 * x [M, K] (float32 or bfloat16) -> per row: q int8 [K], d float [K/32], s = d * sum(q) float
 * [K/32], b16 = sums of q per 16 int16 [K/16]. */

typedef struct { int8_t* q; float* d; float* s; int16_t* b16; int64_t K; } Act;

static void quantize_act_row(const void* x, int bf16, int64_t K, int8_t* q, float* d, float* s, int16_t* b16) {
    for (int64_t b = 0; b < K / 32; b++) {
#ifdef USE_AVX2
        __m256 v[4];
        for (int i = 0; i < 4; i++) {
            if (bf16) {
                __m128i h = _mm_loadu_si128((const __m128i*)((const uint16_t*)x + b * 32 + 8 * i));
                v[i] = _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
            } else {
                v[i] = _mm256_loadu_ps((const float*)x + b * 32 + 8 * i);
            }
        }
        const __m256 sign = _mm256_set1_ps(-0.0f);
        __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v[0]), _mm256_andnot_ps(sign, v[1])),
                                  _mm256_max_ps(_mm256_andnot_ps(sign, v[2]), _mm256_andnot_ps(sign, v[3])));
        __m128 m4 = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
        m4 = _mm_max_ps(m4, _mm_movehl_ps(m4, m4));
        m4 = _mm_max_ss(m4, _mm_movehdup_ps(m4));
        float amax = _mm_cvtss_f32(m4);
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        __m256 idv = _mm256_set1_ps(id);
        __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v[0], idv)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v[1], idv));
        __m256i i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v[2], idv)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v[3], idv));
        __m256i lo = _mm256_add_epi32(i0, i1), hi = _mm256_add_epi32(i2, i3);
        __m128i l4 = _mm_add_epi32(_mm256_castsi256_si128(lo), _mm256_extracti128_si256(lo, 1));
        __m128i h4 = _mm_add_epi32(_mm256_castsi256_si128(hi), _mm256_extracti128_si256(hi, 1));
        __m128i lh = _mm_hadd_epi32(l4, h4);
        lh = _mm_hadd_epi32(lh, lh);
        int s0 = _mm_cvtsi128_si32(lh), s1 = _mm_extract_epi32(lh, 1);
        __m256i p = _mm256_packs_epi16(_mm256_packs_epi32(i0, i1), _mm256_packs_epi32(i2, i3));
        p = _mm256_permutevar8x32_epi32(p, _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
        _mm256_storeu_si256((__m256i*)(q + b * 32), p);
#else
        float v[32], amax = 0.0f;
        for (int i = 0; i < 32; i++) {
            v[i] = bf16 ? from_bf16(((const uint16_t*)x)[b * 32 + i]) : ((const float*)x)[b * 32 + i];
            float a = fabsf(v[i]);
            amax = a > amax ? a : amax;
        }
        float id = amax > 0.0f ? 127.0f / amax : 0.0f;
        int s0 = 0, s1 = 0;
        for (int i = 0; i < 32; i++) {
            int qi = (int)lrintf(v[i] * id);
            q[b * 32 + i] = (int8_t)qi;
            if (i < 16) s0 += qi; else s1 += qi;
        }
#endif
        float dd = amax / 127.0f;
        d[b] = dd;
        s[b] = dd * (float)(s0 + s1);
        b16[2 * b] = (int16_t)s0;
        b16[2 * b + 1] = (int16_t)s1;
    }
}

/* For tests: the activation quantization exactly as the products see it. */
void llmkit_quantize_activations(const void* x, int bf16, int64_t M, int64_t K, int8_t* q, float* d, float* s,
                                 int16_t* b16) {
    for (int64_t m = 0; m < M; m++)
        quantize_act_row((const char*)x + m * K * (bf16 ? 2 : 4), bf16, K, q + m * K, d + m * (K / 32),
                         s + m * (K / 32), b16 + m * (K / 16));
}

/* ------------------------------------------------------------------ group products
 * One group (8 weight rows, all nb blocks; gb its first group block) against MR activation rows
 * m0..m0+MR-1: res[r] (8 lanes: the 8 weight rows) = their dot products. Each weight vector is
 * unpacked in registers once and used for the MR rows. */

#ifdef USE_AVX2

static inline __m256 ph8(const uint8_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128((const __m128i*)p)); }
static inline __m256i ld(const uint8_t* p) { return _mm256_loadu_si256((const __m256i*)p); }
static inline __m256 u8x8(const uint8_t* p) { return _mm256_cvtepi32_ps(_mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i*)p))); }
static inline __m256i bcast4(const int8_t* p) { int32_t v; memcpy(&v, p, 4); return _mm256_set1_epi32(v); }
#define M4 _mm256_set1_epi8(15)
#define ONES16 _mm256_set1_epi16(1)

/* acc (int16 lanes) + products of unsigned weights and signed activations: pairs summed. With VNNI
 * the accumulator is int32 and takes 4 products per lane. */
#ifdef DPBUSD
#define DOT_ADD(acc, w, x) DPBUSD((acc), (w), (x))
#define DOT_FLUSH(i32, acc) _mm256_add_epi32((i32), (acc))
#else
#define DOT_ADD(acc, w, x) _mm256_add_epi16((acc), _mm256_maddubs_epi16((w), (x)))
#define DOT_FLUSH(i32, acc) _mm256_add_epi32((i32), _mm256_madd_epi16((acc), ONES16))
#endif

/* Keeps an accumulator in its register, added to step by step. Without it GCC reassociates the
 * integer sums of a block into a tree of partial products that no longer fit in the 16 vector
 * registers, and spills most of them to the stack. Integer sums are exact: the result is the same. */
#define PIN(v) __asm__("" : "+v"(v))

static inline __m256i high_bits(__m256i qh, int shift) {  /* bit shift+i of each row's u32 -> byte i: 16 or 0 */
    __m256i v = _mm256_srl_epi32(qh, _mm_cvtsi32_si128(shift));
    v = _mm256_shuffle_epi8(v, _mm256_setr_epi8(0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12,
                                                0, 0, 0, 0, 4, 4, 4, 4, 8, 8, 8, 8, 12, 12, 12, 12));
    const __m256i bit = _mm256_set1_epi32(0x08040201);
    return _mm256_and_si256(_mm256_cmpeq_epi8(_mm256_and_si256(v, bit), bit), _mm256_set1_epi8(16));
}

#define ROW_PTRS                                                                                  \
    const int64_t K = a->K, n32 = K / 32;                                                         \
    const int8_t* x[4]; const float *xd[4], *xs[4]; const int16_t* xb[4];                        \
    for (int r = 0; r < MR; r++) {                                                                \
        x[r] = a->q + (m0 + r) * K; xd[r] = a->d + (m0 + r) * n32; xs[r] = a->s + (m0 + r) * n32; \
        xb[r] = a->b16 + (m0 + r) * (K / 16);                                                     \
    }                                                                                             \
    (void)xs; (void)xb;

/* Q4_0, Q4_1, Q5_0, Q5_1, Q8_0: one block of 32 per group block; step k holds values 4k..4k+3. */
static inline __attribute__((always_inline)) void rows_small(const int t, const uint8_t* gb, int64_t nb, const Act* a,
                                                              int64_t m0, const int MR, __m256* res) {
    const int off = t == Q4_1 || t == Q5_1, five = t == Q5_0 || t == Q5_1, GB = 8 * llmkit_block_bytes(t);
    ROW_PTRS
    __m256 acc[4];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* g = gb + b * GB;
        __m256 d = ph8(g);
        __m256i i32[4], p[4];
        for (int r = 0; r < MR; r++) i32[r] = p[r] = _mm256_setzero_si256();
        if (t == Q8_0) {  /* signed weights: |w| times x with w's sign */
            for (int k = 0; k < 8; k++) {
                __m256i w = ld(g + 16 + 32 * k), aw = _mm256_sign_epi8(w, w);
                for (int r = 0; r < MR; r++) {
                    __m256i xv = _mm256_sign_epi8(bcast4(x[r] + 32 * b + 4 * k), w);
#ifdef DPBUSD
                    i32[r] = DPBUSD(i32[r], aw, xv);
#else
                    i32[r] = _mm256_add_epi32(i32[r], _mm256_madd_epi16(_mm256_maddubs_epi16(aw, xv), ONES16));
#endif
                    PIN(i32[r]);
                }
            }
        } else {
            const uint8_t* q = g + 16 + 16 * off + 32 * five;
            for (int k = 0; k < 8; k++) {  /* 4-bit: 8 products per int16 lane; 5-bit: 4 */
                __m256i raw = ld(q + 32 * (k & 3));
                __m256i w = k < 4 ? _mm256_and_si256(raw, M4) : _mm256_and_si256(_mm256_srli_epi16(raw, 4), M4);
                if (five) w = _mm256_or_si256(w, high_bits(ld(g + 16 + 16 * off), k < 4 ? 4 * k : 16 + 4 * (k - 4)));
                for (int r = 0; r < MR; r++) {
                    p[r] = DOT_ADD(p[r], w, bcast4(x[r] + 32 * b + 4 * k));
                    if (!five) PIN(p[r]);  /* not for the 5-bit formats: there it gained nothing or cost time */
                }
                if (five && k == 3)
                    for (int r = 0; r < MR; r++) { i32[r] = DOT_FLUSH(i32[r], p[r]); p[r] = _mm256_setzero_si256(); }
            }
            for (int r = 0; r < MR; r++) i32[r] = DOT_FLUSH(i32[r], p[r]);
        }
        __m256 fmin = off ? ph8(g + 16) : _mm256_mul_ps(d, _mm256_set1_ps(five ? -16.0f : -8.0f));
        for (int r = 0; r < MR; r++) {
            acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[r]), _mm256_mul_ps(d, _mm256_set1_ps(xd[r][b])), acc[r]);
            if (t != Q8_0) acc[r] = _mm256_fmadd_ps(fmin, _mm256_set1_ps(xs[r][b]), acc[r]);
        }
    }
    for (int r = 0; r < MR; r++) res[r] = acc[r];
}

/* Q4_K, Q5_K: 8 sub-blocks of 32 per block, each with a 6-bit scale and minimum per row. */
static inline __attribute__((always_inline)) void rows_k45(const int t, const uint8_t* gb, int64_t nb, const Act* a,
                                                            int64_t m0, const int MR, __m256* res) {
    const int GB = llmkit_group_bytes(t), five = t == Q5_K;
    ROW_PTRS
    __m256 acc[4];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* g = gb + b * GB;
        const uint8_t* qs = g + (five ? 416 : 160);
        __m256 d = ph8(g), negmin = _mm256_sub_ps(_mm256_setzero_ps(), ph8(g + 16));
        for (int j = 0; j < 8; j++) {
            __m256i i32[4], p[4];
            for (int r = 0; r < MR; r++) i32[r] = p[r] = _mm256_setzero_si256();
            for (int v = 0; v < 8; v++) {
                __m256i raw = ld(qs + 256 * (j / 2) + 32 * v);
                __m256i w = j & 1 ? _mm256_and_si256(_mm256_srli_epi16(raw, 4), M4) : _mm256_and_si256(raw, M4);
                if (five) {
                    __m256i h = _mm256_srl_epi16(ld(g + 160 + 32 * v), _mm_cvtsi32_si128(j));
                    w = _mm256_or_si256(w, _mm256_slli_epi16(_mm256_and_si256(h, _mm256_set1_epi8(1)), 4));
                }
                for (int r = 0; r < MR; r++) {
                    p[r] = DOT_ADD(p[r], w, bcast4(x[r] + 256 * b + 32 * j + 4 * v));
                    if (!five) PIN(p[r]);
                }
                if (five && v == 3)
                    for (int r = 0; r < MR; r++) { i32[r] = DOT_FLUSH(i32[r], p[r]); p[r] = _mm256_setzero_si256(); }
            }
            __m256 dsc = _mm256_mul_ps(d, u8x8(g + 32 + 8 * j)), fmin = _mm256_mul_ps(negmin, u8x8(g + 96 + 8 * j));
            for (int r = 0; r < MR; r++) {
                i32[r] = DOT_FLUSH(i32[r], p[r]);
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i32[r]), _mm256_mul_ps(dsc, _mm256_set1_ps(xd[r][8 * b + j])), acc[r]);
                acc[r] = _mm256_fmadd_ps(fmin, _mm256_set1_ps(xs[r][8 * b + j]), acc[r]);
            }
        }
    }
    for (int r = 0; r < MR; r++) res[r] = acc[r];
}

/* Q6_K: 16 sub-blocks of 16 with int8 scales per row; values stored as q + 32 (0..63), the 32
 * taken off through the activations' sums per 16. Activation block j (32 values) is half h = j/4,
 * part j%4 of the format's layout; a half's high bits (256 bytes) lie just before its low bits
 * (512), see F_Q6_K. */
static inline __attribute__((always_inline)) void rows_q6_k(const uint8_t* gb, int64_t nb, const Act* a, int64_t m0,
                                                             const int MR, __m256* res) {
    ROW_PTRS
    const __m256i m2 = _mm256_set1_epi8(3);
    __m256 acc[4];
    for (int r = 0; r < MR; r++) acc[r] = _mm256_setzero_ps();
    for (int64_t b = 0; b < nb; b++) {
        const uint8_t* g = gb + b * 1680;
        __m256 d = ph8(g);
        for (int j = 0; j < 8; j++) {
            const int h = j / 4, part = j % 4;
            __m256i isc[2];  /* each row's scale twice as int16, for the two sub-blocks */
            for (int s = 0; s < 2; s++) {
                __m256i v = _mm256_cvtepi8_epi32(_mm_loadl_epi64((const __m128i*)(g + 16 + 8 * (2 * j + s))));
                isc[s] = _mm256_or_si256(_mm256_and_si256(v, _mm256_set1_epi32(0xffff)), _mm256_slli_epi32(v, 16));
            }
            __m256i i32[4];
            for (int r = 0; r < MR; r++) i32[r] = _mm256_setzero_si256();
            for (int v0 = 0; v0 < 8; v0 += 2) {  /* values up to 63: 2 products per int16 lane */
                __m256i p[4];
                for (int r = 0; r < MR; r++) p[r] = _mm256_setzero_si256();
                for (int v = v0; v < v0 + 2; v++) {
                    __m256i l = ld(g + 400 + 768 * h + 32 * (v + 8 * (part & 1)));
                    __m256i hb = _mm256_srl_epi16(ld(g + 144 + 768 * h + 32 * v), _mm_cvtsi32_si128(2 * part));
                    __m256i lo = part >= 2 ? _mm256_srli_epi16(l, 4) : l;
                    __m256i w = _mm256_or_si256(_mm256_and_si256(lo, M4), _mm256_slli_epi16(_mm256_and_si256(hb, m2), 4));
                    for (int r = 0; r < MR; r++)
                        p[r] = _mm256_add_epi16(p[r], _mm256_maddubs_epi16(w, bcast4(x[r] + 256 * b + 32 * j + 4 * v)));
                }
                for (int r = 0; r < MR; r++) i32[r] = _mm256_add_epi32(i32[r], _mm256_madd_epi16(p[r], isc[v0 >= 4]));
            }
            for (int r = 0; r < MR; r++) {
                const int16_t* sums = xb[r] + 16 * b + 2 * j;
                __m256i c = _mm256_add_epi32(_mm256_madd_epi16(isc[0], _mm256_set1_epi32((uint16_t)sums[0])),
                                             _mm256_madd_epi16(isc[1], _mm256_set1_epi32((uint16_t)sums[1])));
                __m256i i = _mm256_sub_epi32(i32[r], _mm256_slli_epi32(c, 5));
                acc[r] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(i), _mm256_mul_ps(d, _mm256_set1_ps(xd[r][8 * b + j])), acc[r]);
            }
        }
    }
    for (int r = 0; r < MR; r++) res[r] = acc[r];
}

#define BY_MR(CALL) switch (mr) { case 4: CALL(4); break; case 3: CALL(3); break; case 2: CALL(2); break; default: CALL(1); }

/* Rows m0..m0+mr-1 (mr <= 4) of the activations against one group: out[r * 8 + i], row i of the group. */
static void group_rows(int t, const uint8_t* gb, int64_t nb, const Act* a, int64_t m0, int mr, float* out) {
    __m256 res[4];
#define SMALL(MR) rows_small(T, gb, nb, a, m0, MR, res)
#define K45(MR) rows_k45(T, gb, nb, a, m0, MR, res)
#define Q6(MR) rows_q6_k(gb, nb, a, m0, MR, res)
    switch (t) {
#define T Q4_0
    case T: BY_MR(SMALL) break;
#undef T
#define T Q4_1
    case T: BY_MR(SMALL) break;
#undef T
#define T Q5_0
    case T: BY_MR(SMALL) break;
#undef T
#define T Q5_1
    case T: BY_MR(SMALL) break;
#undef T
#define T Q8_0
    case T: BY_MR(SMALL) break;
#undef T
#define T Q4_K
    case T: BY_MR(K45) break;
#undef T
#define T Q5_K
    case T: BY_MR(K45) break;
#undef T
    case Q6_K: BY_MR(Q6) break;
    }
    for (int r = 0; r < mr; r++) _mm256_storeu_ps(out + 8 * r, res[r]);
}

#else  /* portable: unpack each row's block and multiply value by value */

static void group_rows(int t, const uint8_t* gb, int64_t nb, const Act* a, int64_t m0, int mr, float* out) {
    int E = llmkit_block_elems(t), off = has_offset(t), GB = llmkit_group_bytes(t);
    int64_t K = a->K;
    uint8_t blk[256];
    int8_t q[256];
    float f[16], o[16];
    memset(out, 0, sizeof(float) * 8 * mr);
    for (int64_t b = 0; b < nb; b++)
        for (int i = 0; i < 8; i++) {
            get_block(t, gb + b * GB, i, blk);
            unpack(t, blk, q, f, o);
            for (int r = 0; r < mr; r++) {
                int64_t m = m0 + r;
                const int8_t* xq = a->q + m * K + b * E;
                const float* xd = a->d + m * (K / 32) + b * (E / 32);
                const int16_t* xb = a->b16 + m * (K / 16) + b * (E / 16);
                float sum = 0.0f;
                for (int h = 0; h < E / 16; h++) {
                    int dot = 0;
                    for (int e = 0; e < 16; e++) dot += q[16 * h + e] * xq[16 * h + e];
                    sum += xd[h / 2] * (f[h] * (float)dot + (off ? o[h] * (float)xb[h] : 0.0f));
                }
                out[8 * r + i] += sum;
            }
        }
}
#endif

/* ------------------------------------------------------------------ the product
 * y [M, N] = x [M, K] @ W.T, W packed, x and y float32 or bfloat16. OpenMP over groups of 8
 * output rows: each thread takes one contiguous range of groups (one sequential stream of
 * weights). Activation rows go in blocks of MBLOCK, which stay in cache while the thread's
 * weights pass by, and within them 4 at a time through each group. */

#define MBLOCK 64

/* Groups g0..g1-1 of W against all M activation rows. */
static void product_part(int t, const uint8_t* w, int64_t N, int64_t nb, const Act* a, void* y, int y_bf16, int64_t M,
                         int64_t g0, int64_t g1) {
    int64_t GB = llmkit_group_bytes(t);
    float out[32];
    for (int64_t mb = 0; mb < M; mb += MBLOCK) {
        int64_t me = mb + MBLOCK < M ? mb + MBLOCK : M;
        for (int64_t g = g0; g < g1; g++) {
            int rows = N - g * 8 < 8 ? (int)(N - g * 8) : 8;
            for (int64_t m = mb; m < me; m += 4) {
                int mr = me - m < 4 ? (int)(me - m) : 4;
                group_rows(t, w + g * nb * GB, nb, a, m, mr, out);
                for (int r = 0; r < mr; r++) {
                    if (y_bf16) for (int i = 0; i < rows; i++) ((uint16_t*)y)[(m + r) * N + g * 8 + i] = to_bf16(out[8 * r + i]);
                    else memcpy((float*)y + (m + r) * N + g * 8, out + 8 * r, sizeof(float) * rows);
                }
            }
        }
    }
}

void llmkit_matmul(int t, const uint8_t* w, int64_t N, int64_t K, const void* x, int x_bf16, void* y, int y_bf16,
                   int64_t M, int nthreads) {
    int64_t n32 = K / 32, nb = K / llmkit_block_elems(t), groups = (N + 7) / 8;
    int8_t* buf = malloc((size_t)(M * K + M * n32 * 8 + M * (K / 16) * 2) + 64);
    if (!buf) return;
    Act a = {buf, (float*)(buf + ((M * K + 31) & ~31)), NULL, NULL, K};
    a.s = a.d + M * n32;
    a.b16 = (int16_t*)(a.s + M * n32);
    if (N * K * (M < 8 ? M : 8) <= 65536 || nthreads <= 1) {
        /* Small work: no parallel region at all. (Switching libgomp's team between one thread and
         * several costs more than such a product.) */
        llmkit_quantize_activations(x, x_bf16, M, K, a.q, a.d, a.s, a.b16);
        product_part(t, w, N, nb, &a, y, y_bf16, M, 0, groups);
        free(buf);
        return;
    }
    int serial = M * K <= 16384;
    if (serial) llmkit_quantize_activations(x, x_bf16, M, K, a.q, a.d, a.s, a.b16);
    #pragma omp parallel num_threads(nthreads)
    {
        int nt = 1, id = 0;
#ifdef _OPENMP
        nt = omp_get_num_threads();
        id = omp_get_thread_num();
#endif
        if (!serial) {
            #pragma omp for schedule(static)
            for (int64_t m = 0; m < M; m++)
                quantize_act_row((const char*)x + m * K * (x_bf16 ? 2 : 4), x_bf16, K, a.q + m * K, a.d + m * n32,
                                 a.s + m * n32, a.b16 + m * (K / 16));
        }
        int64_t per = (groups + nt - 1) / nt, g0 = id * per, g1 = g0 + per < groups ? g0 + per : groups;
        product_part(t, w, N, nb, &a, y, y_bf16, M, g0, g1);
    }
    free(buf);
}

/* The same, with the matrix described once (the call from Python passes fewer arguments):
 * flags bit 0: x is bfloat16, bit 1: y is bfloat16. */
typedef struct { int64_t type; const uint8_t* w; int64_t N, K; } Matrix;

void llmkit_matmul_m(const Matrix* mat, const void* x, void* y, int64_t M, int flags, int nthreads) {
    llmkit_matmul((int)mat->type, mat->w, mat->N, mat->K, x, flags & 1, y, (flags >> 1) & 1, M, nthreads);
}

/* ------------------------------------------------------------------ quantizing float weights */

static void quant_q8_0(const float* x, uint8_t* out) {  /* as gguf.quants: d = max|x| / 127, round half away */
    float amax = 0.0f;
    for (int i = 0; i < 32; i++) amax = fabsf(x[i]) > amax ? fabsf(x[i]) : amax;
    float d = amax / 127.0f, id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = to_f16(d);
    memcpy(out, &h, 2);
    for (int i = 0; i < 32; i++) out[2 + i] = (uint8_t)(int8_t)roundf(x[i] * id);
}

static void quant_q4_0_q5_0(const float* x, uint8_t* out, int five) {  /* as gguf.quants */
    float amax = 0.0f, mx = 0.0f;
    for (int i = 0; i < 32; i++) if (fabsf(x[i]) > amax) { amax = fabsf(x[i]); mx = x[i]; }
    float d = mx / (five ? -16.0f : -8.0f), id = d != 0.0f ? 1.0f / d : 0.0f;
    uint16_t h = to_f16(d);
    memcpy(out, &h, 2);
    int top = five ? 31 : 15;
    uint32_t qh = 0;
    uint8_t q[32];
    for (int i = 0; i < 32; i++) {
        float v = truncf(x[i] * id + (five ? 16.5f : 8.5f));
        int qi = v < 0.0f ? 0 : (v > (float)top ? top : (int)v);
        q[i] = (uint8_t)qi;
        qh |= (uint32_t)((qi >> 4) & 1) << i;
    }
    uint8_t* qs = out + (five ? 6 : 2);
    if (five) memcpy(out + 2, &qh, 4);
    for (int j = 0; j < 16; j++) qs[j] = (uint8_t)((q[j] & 15) | ((q[j + 16] & 15) << 4));
}

/* Q4_K: each sub-block of 32 gets the scale and minimum that fit it best in least squares (a few
 * rounds of: assign levels, refit scale and minimum), then the eight scales and minimums are
 * stored in 6 bits against the block's largest, and the levels assigned again with the stored
 * values. */
static void fit_sub(const float* x, float* scale, float* mn) {
    float lo = x[0], hi = x[0];
    for (int i = 1; i < 32; i++) { lo = x[i] < lo ? x[i] : lo; hi = x[i] > hi ? x[i] : hi; }
    if (lo > 0.0f) lo = 0.0f;  /* the format subtracts a non-negative minimum */
    float s = (hi - lo) / 15.0f, m = -lo;
    if (s <= 0.0f) { *scale = 0.0f; *mn = m; return; }
    for (int it = 0; it < 4; it++) {
        double sq = 0, sx = 0, sqq = 0, sqx = 0;
        for (int i = 0; i < 32; i++) {
            float v = nearbyintf((x[i] + m) / s);
            v = v < 0.0f ? 0.0f : (v > 15.0f ? 15.0f : v);
            sq += v; sx += x[i]; sqq += v * v; sqx += v * x[i];
        }
        double det = 32.0 * sqq - sq * sq;
        if (det <= 0.0) break;
        double ns = (32.0 * sqx - sq * sx) / det, nm = -(sx - ns * sq) / 32.0;
        if (ns <= 0.0 || nm < 0.0) break;
        s = (float)ns; m = (float)nm;
    }
    *scale = s; *mn = m;
}

static void quant_q4_k(const float* x, uint8_t* out) {
    float sc[8], mn[8], smax = 0.0f, mmax = 0.0f;
    for (int j = 0; j < 8; j++) {
        fit_sub(x + 32 * j, &sc[j], &mn[j]);
        smax = sc[j] > smax ? sc[j] : smax;
        mmax = mn[j] > mmax ? mn[j] : mmax;
    }
    float d = smax / 63.0f, dmin = mmax / 63.0f;
    uint16_t hd = to_f16(d), hm = to_f16(dmin);
    memcpy(out, &hd, 2);
    memcpy(out + 2, &hm, 2);
    d = f16(out); dmin = f16(out + 2);  /* assign levels against the stored values */
    uint8_t ls[8], lm[8];
    for (int j = 0; j < 8; j++) {
        int a = d > 0.0f ? (int)nearbyintf(sc[j] / d) : 0, b = dmin > 0.0f ? (int)nearbyintf(mn[j] / dmin) : 0;
        ls[j] = (uint8_t)(a > 63 ? 63 : (a < 0 ? 0 : a));
        lm[j] = (uint8_t)(b > 63 ? 63 : (b < 0 ? 0 : b));
    }
    uint8_t* s = out + 4;
    for (int j = 0; j < 4; j++) {
        s[j] = (uint8_t)(ls[j] | ((ls[j + 4] >> 4) << 6));
        s[j + 4] = (uint8_t)(lm[j] | ((lm[j + 4] >> 4) << 6));
        s[j + 8] = (uint8_t)((ls[j + 4] & 15) | ((lm[j + 4] & 15) << 4));
    }
    uint8_t* qs = out + 16;
    for (int j = 0; j < 8; j++) {
        float f = d * (float)ls[j], o = dmin * (float)lm[j];
        for (int l = 0; l < 32; l++) {
            int v = f > 0.0f ? (int)nearbyintf((x[32 * j + l] + o) / f) : 0;
            v = v < 0 ? 0 : (v > 15 ? 15 : v);
            uint8_t* c = qs + (j / 2) * 32 + l;
            *c = j & 1 ? (uint8_t)((*c & 15) | (v << 4)) : (uint8_t)v;
        }
    }
}

/* x [N, K] float32 -> W in format t (Q8_0, Q4_0, Q5_0 or Q4_K); 0, or -1 for a format it cannot write. */
int llmkit_quantize(int t, const float* x, int64_t N, int64_t K, uint8_t* out, int nthreads) {
    if (t != Q8_0 && t != Q4_0 && t != Q5_0 && t != Q4_K) return -1;
    int E = llmkit_block_elems(t), B = llmkit_block_bytes(t);
    int64_t nb = N * (K / E);
    #pragma omp parallel for num_threads(nthreads) schedule(static)
    for (int64_t i = 0; i < nb; i++) {
        const float* src = x + i * E;
        uint8_t* dst = out + i * B;
        if (t == Q8_0) quant_q8_0(src, dst);
        else if (t == Q4_K) quant_q4_k(src, dst);
        else quant_q4_0_q5_0(src, dst, t == Q5_0);
    }
    return 0;
}

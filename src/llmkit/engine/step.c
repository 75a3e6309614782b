/* A whole pass of a Llama-family model in one call (llmkit.engine.step).
 *
 * Handed the block-format matrix product of llmkit.engine.quant as a function pointer, so that
 * kernel keeps one home. What runs per layer, for B rows of one token each, all float32:
 *   rms_norm -> q|k|v (one stacked matrix) -> per-head q/k norms -> rotary embedding -> k, v into
 *   the cache -> attention -> o -> residual -> rms_norm -> gate|up (one stacked matrix) -> silu(gate)
 *   * up -> down -> residual.
 * The same steps as llmkit.model's modules in the same order; what differs is only where Python
 * would dispatch each small operation separately. Rows may share a cache slot at consecutive
 * positions (a prompt chunk, a speculative check): every row's keys are written before any row
 * attends, and each row sees its slot's positions up to its own.
 */

#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

typedef struct { int64_t type; const void* w; int64_t N, K; } Matrix;  /* as quant.c's */
typedef void (*matmul_fn)(const Matrix*, const void*, void*, int64_t, int, int);

typedef struct {
    const Matrix *qkv, *o, *gate_up, *down;  /* qkv, gate_up: NULL where the parts are kept apart */
    const Matrix *q, *k, *v, *gate, *up;     /* the parts (block types differ: Q4_K_M's v in Q6_K) */
    const float *attn_norm, *mlp_norm;
    const float *q_norm, *k_norm;  /* NULL where the model has no per-head q/k norms */
} Layer;

typedef struct {
    int64_t layers, C, H, Hk, D, F, rot, window;  /* window 0: every earlier position is seen */
    float eps, scale, rope_factor;
    const float* inv_freq;  /* rot / 2 */
    const Layer* layer;
    matmul_fn matmul;
} StepModel;

/* LoRA: a row on an adapter adds (x @ A^T) @ (scaling * B^T) to each product the adapter changes.
 * The table holds, per adapter, per layer, one entry per module in the order below; a = NULL where
 * the adapter leaves that module alone. */
enum { L_Q, L_K, L_V, L_O, L_GATE, L_UP, L_DOWN, L_MODULES };
typedef struct { const float *a, *b; int64_t r; } LoRA;  /* a: [in, r], b: [r, out], row-major */

static void lora_add(const LoRA* l, const float* x, int64_t in, float* y, int64_t out) {
    if (!l->a) return;
    float t[256];  /* rank at most 256 (checked by the caller) */
    for (int64_t j = 0; j < l->r; j++) t[j] = 0.0f;
    for (int64_t i = 0; i < in; i++)
        for (int64_t j = 0; j < l->r; j++) t[j] += x[i] * l->a[i * l->r + j];
    for (int64_t j = 0; j < l->r; j++)
        for (int64_t o = 0; o < out; o++) y[o] += t[j] * l->b[j * out + o];
}

static void rms_norm(const float* x, const float* w, float* out, int64_t n, float eps) {
    float ss = 0.0f;
    for (int64_t i = 0; i < n; i++) ss += x[i] * x[i];
    float r = 1.0f / sqrtf(ss / (float)n + eps);
    for (int64_t i = 0; i < n; i++) out[i] = x[i] * r * w[i];
}

/* The first rot dims of a head, in the half-split layout of HF checkpoints. */
static void rope(float* v, const float* c, const float* s, int64_t half) {
    for (int64_t i = 0; i < half; i++) {
        float a = v[i], b = v[i + half];
        v[i] = a * c[i] - b * s[i];
        v[i + half] = b * c[i] + a * s[i];
    }
}

/* ------------------------------------------------------------------ attention over the cache
 * Rows of one slot at consecutive positions (a prompt chunk, or a speculative check's rows) attend
 * together: a task takes up to NQ query vectors (some rows' query heads that share one key head)
 * and walks that head's keys and values once for all of them, instead of once per row. Each
 * query's arithmetic does not depend on which others share its task: its dot products, its
 * softmax over its own key range and its weighted sum of values (in which keys outside its range
 * weigh exactly 0) come out the same for a row alone as for a row in a block. */

#define NQ 12

#if defined(__AVX2__) && defined(__FMA__)
#include <immintrin.h>

/* Lane j of the result: the sum of a[j]'s eight lanes (one key's dot product). */
static inline __m256 sum8(const __m256* a) {
    __m256 u0 = _mm256_hadd_ps(_mm256_hadd_ps(a[0], a[1]), _mm256_hadd_ps(a[2], a[3]));
    __m256 u1 = _mm256_hadd_ps(_mm256_hadd_ps(a[4], a[5]), _mm256_hadd_ps(a[6], a[7]));
    return _mm256_add_ps(_mm256_permute2f128_ps(u0, u1, 0x20), _mm256_permute2f128_ps(u0, u1, 0x31));
}

/* Eight keys' dot products with one query: lane j for key j (nk < 8: the first nk lanes). */
static inline __attribute__((always_inline)) __m256 dots8(const float* qi, const float* k, int D, const int nk) {
    __m256 a[8];
    for (int j = 0; j < 8; j++) a[j] = _mm256_setzero_ps();
    for (int c = 0; c < D; c += 8) {
        const __m256 qv = _mm256_loadu_ps(qi + c);
        for (int j = 0; j < nk; j++) a[j] = _mm256_fmadd_ps(qv, _mm256_loadu_ps(k + j * D + c), a[j]);
    }
    return sum8(a);
}

/* s[i * ss + l - L0] = q_i . k_l for keys l in [L0, L1); D a multiple of 8. */
static void scores_v(const float* qs, int nq, const float* kb, int64_t L0, int64_t L1, int D, float* s, int64_t ss) {
    int64_t l = L0;
    for (; l + 8 <= L1; l += 8)
        for (int i = 0; i < nq; i++) _mm256_storeu_ps(s + i * ss + (l - L0), dots8(qs + i * D, kb + l * D, D, 8));
    if (l < L1) {
        const int nk = (int)(L1 - l);
        for (int i = 0; i < nq; i++) {
            float out[8];
            _mm256_storeu_ps(out, dots8(qs + i * D, kb + l * D, D, nk));
            memcpy(s + i * ss + (l - L0), out, sizeof(float) * nk);
        }
    }
}

/* out_i = sum over keys l in [L0, L1) of p_il v_l, for NQ_ (a constant) queries at once. */
static inline __attribute__((always_inline)) void weigh_n(const float* s, int64_t ss, const float* vb, int64_t L0,
                                                          int64_t L1, int D, float** out, const int NQ_) {
    for (int c = 0; c < D; c += 8) {
        __m256 acc[NQ];
        for (int i = 0; i < NQ_; i++) acc[i] = _mm256_setzero_ps();
        for (int64_t l = L0; l < L1; l++) {
            const __m256 v = _mm256_loadu_ps(vb + l * D + c);
            for (int i = 0; i < NQ_; i++) acc[i] = _mm256_fmadd_ps(_mm256_broadcast_ss(s + i * ss + (l - L0)), v, acc[i]);
        }
        for (int i = 0; i < NQ_; i++) _mm256_storeu_ps(out[i] + c, acc[i]);
    }
}

static void weigh_v(const float* s, int64_t ss, const float* vb, int64_t L0, int64_t L1, int D, float** out, int nq) {
#define W(n) case n: weigh_n(s, ss, vb, L0, L1, D, out, n); break;
    switch (nq) { W(1) W(2) W(3) W(4) W(5) W(6) W(7) W(8) W(9) W(10) W(11) W(12) }
#undef W
}
#define VECTOR_ATTENTION 1
#endif

/* The same for any D, one value at a time. */
static void scores(const float* qs, int nq, const float* kb, int64_t L0, int64_t L1, int D, float* s, int64_t ss) {
    for (int64_t l = L0; l < L1; l++)
        for (int i = 0; i < nq; i++) {
            float dot = 0.0f;
            for (int d = 0; d < D; d++) dot += qs[i * D + d] * kb[l * D + d];
            s[i * ss + (l - L0)] = dot;
        }
}

static void weigh(const float* s, int64_t ss, const float* vb, int64_t L0, int64_t L1, int D, float** out, int nq) {
    for (int i = 0; i < nq; i++) {
        for (int d = 0; d < D; d++) out[i][d] = 0.0f;
        for (int64_t l = L0; l < L1; l++) {
            const float p = s[i * ss + (l - L0)];
            for (int d = 0; d < D; d++) out[i][d] += p * vb[l * D + d];
        }
    }
}

/* q [B, H, D] (query head h*G+g belongs to key head h), rows' slots and key ranges [lo, hi)
 * (hi: position + 1); the cache of one layer (slots, Hk, max_len, D) -> out [B, H, D]. */
static int rows_attention(const float* q, const float* kc, const float* vc, const int64_t* slot, const int64_t* lo,
                          const int64_t* hi, float* out, int64_t B, int64_t Hk, int64_t G, int64_t D, int64_t max_len,
                          float scale, int nthreads) {
    /* Tasks: (first row, rows, first head in the group, heads) for each key head. Rows join a
     * task while they continue the previous row's slot at the next position. */
    const int64_t per = G <= NQ ? NQ / G : 1, hstep = G <= NQ ? G : NQ;
    int64_t* task = malloc(sizeof(int64_t) * 4 * (B * ((G + hstep - 1) / hstep) + 1));
    if (!task) return -1;
    int64_t nt = 0;
    for (int64_t b = 0; b < B;) {
        int64_t e = b + 1;
        while (e < B && e - b < per && slot[e] == slot[b] && hi[e] == hi[e - 1] + 1) e++;
        for (int64_t g = 0; g < G; g += hstep) {
            task[4 * nt] = b; task[4 * nt + 1] = e - b; task[4 * nt + 2] = g;
            task[4 * nt + 3] = G - g < hstep ? G - g : hstep;
            nt++;
        }
        b = e;
    }
    int64_t span = 1;
    for (int64_t b = 0; b < B; b++) span = hi[b] - lo[b] > span ? hi[b] - lo[b] : span;
    const int64_t ss = span + NQ;  /* a task's keys: its rows' ranges together */
    int failed = 0;
    #pragma omp parallel num_threads(nthreads) if (nt * Hk > 1 && nthreads > 1)
    {
        float* scratch = malloc(sizeof(float) * (NQ * ss + NQ * D));
        if (!scratch) {
            #pragma omp atomic write
            failed = 1;
        }
        #pragma omp for schedule(dynamic, 1)
        for (int64_t th = 0; th < nt * Hk; th++) {
            if (!scratch) continue;
            const int64_t* t = task + 4 * (th / Hk);
            const int64_t h = th % Hk, b0 = t[0], rows = t[1], g0 = t[2], heads = t[3];
            const int nq = (int)(rows * heads);
            float *s = scratch, *qs = scratch + NQ * ss;
            float* outs[NQ];
            int64_t qlo[NQ], qhi[NQ], L0 = lo[b0], L1 = hi[b0];
            for (int64_t r = 0; r < rows; r++) {
                const int64_t b = b0 + r;
                L0 = lo[b] < L0 ? lo[b] : L0;
                L1 = hi[b] > L1 ? hi[b] : L1;
                for (int64_t g = 0; g < heads; g++) {
                    const int64_t i = r * heads + g, at = (b * Hk * G + h * G + g0 + g) * D;
                    for (int64_t d = 0; d < D; d++) qs[i * D + d] = q[at + d] * scale;
                    outs[i] = out + at;
                    qlo[i] = lo[b]; qhi[i] = hi[b];
                }
            }
            const int64_t base = (slot[b0] * Hk + h) * max_len * D;
#ifdef VECTOR_ATTENTION
            const int vec = D % 8 == 0;
#else
            const int vec = 0;
#endif
            if (vec) scores_v(qs, nq, kc + base, L0, L1, (int)D, s, ss);
            else scores(qs, nq, kc + base, L0, L1, (int)D, s, ss);
            for (int i = 0; i < nq; i++) {  /* softmax over the query's own keys; 0 for the rest */
                float* si = s + i * ss;
                const int64_t a = qlo[i] - L0, n = qhi[i] - qlo[i];
                float m = si[a], part[8] = {0}, sum;
                for (int64_t l = 0; l < n; l++) m = si[a + l] > m ? si[a + l] : m;
                #pragma omp simd
                for (int64_t l = 0; l < n; l++) si[a + l] = expf(si[a + l] - m);
                for (int64_t l = 0; l < n; l++) part[l % 8] += si[a + l];  /* a fixed order of sums */
                sum = ((part[0] + part[1]) + (part[2] + part[3])) + ((part[4] + part[5]) + (part[6] + part[7]));
                const float inv = 1.0f / sum;
                #pragma omp simd
                for (int64_t l = 0; l < n; l++) si[a + l] *= inv;
                for (int64_t l = 0; l < a; l++) si[l] = 0.0f;
                for (int64_t l = a + n; l < L1 - L0; l++) si[l] = 0.0f;
            }
            if (vec) weigh_v(s, ss, vc + base, L0, L1, (int)D, outs, nq);
            else weigh(s, ss, vc + base, L0, L1, (int)D, outs, nq);
        }
        free(scratch);
    }
    free(task);
    return failed ? -1 : 0;
}

/* x [B, C] float32, in place: the hidden states after every layer. slot, pos [B]: each row's cache
 * slot and position, checked by the caller against the cache (slots x max_len). kc, vc: the whole
 * cache, (layers, slots, Hk, max_len, D) float32. adapter [B]: each row's LoRA adapter, an index
 * into the table lora (adapters x layers x L_MODULES), or -1 for the base model; adapter may be
 * NULL when no row has one. Returns 0, or -1 when memory ran out. */
int llmkit_decode_layers(const StepModel* m, float* x, int64_t B, const int64_t* slot, const int64_t* pos,
                         float* kc, float* vc, int64_t cache_slots, int64_t max_len, int nthreads,
                         const LoRA* lora, const int64_t* adapter) {
    const int64_t C = m->C, H = m->H, Hk = m->Hk, D = m->D, F = m->F, half = m->rot / 2, G = H / Hk;
    const int64_t QKV = (H + 2 * Hk) * D, stride = cache_slots * Hk * max_len * D;
    /* Many rows (a prompt chunk): the work on each row outside the products is shared among the
     * threads too; a few (decode) stay on this thread, where a parallel region costs more. */
    const int wide = B >= 16 && nthreads > 1;
    float* buf = malloc(sizeof(float) * B * (C + 2 * QKV + 2 * H * D + C + 3 * F + 2 * half) + sizeof(int64_t) * 2 * B);
    if (!buf) return -1;
    float *xn = buf, *qkv = xn + B * C, *q = qkv + B * QKV, *att = q + B * H * D, *tmp = att + B * H * D;
    float *gu = tmp + B * C, *hh = gu + B * 2 * F, *cs = hh + B * F, *sn = cs + B * half, *tmp2 = sn + B * half;
    int64_t *lo = (int64_t*)(tmp2 + B * QKV), *hi = lo + B;
    #pragma omp parallel for num_threads(nthreads) if (wide)
    for (int64_t b = 0; b < B; b++) {
        hi[b] = pos[b] + 1;
        lo[b] = m->window > 0 && hi[b] > m->window ? hi[b] - m->window : 0;
        for (int64_t i = 0; i < half; i++) {  /* as llmkit.model.rope_tables: float32 angle */
            float angle = (float)pos[b] * m->inv_freq[i];
            cs[b * half + i] = cosf(angle) * m->rope_factor;
            sn[b * half + i] = sinf(angle) * m->rope_factor;
        }
    }
    for (int64_t l = 0; l < m->layers; l++) {
        const Layer* L = m->layer + l;
        float *kl = kc + l * stride, *vl = vc + l * stride;
        #pragma omp parallel for num_threads(nthreads) if (wide)
        for (int64_t b = 0; b < B; b++) rms_norm(x + b * C, L->attn_norm, xn + b * C, C, m->eps);
        /* each row's q, k and v at qkv + b * QKV: stacked, one product; apart, three, side by side */
        if (L->qkv) {
            m->matmul(L->qkv, xn, qkv, B, 0, nthreads);
        } else {
            m->matmul(L->q, xn, tmp2, B, 0, nthreads);
            m->matmul(L->k, xn, tmp2 + B * H * D, B, 0, nthreads);
            m->matmul(L->v, xn, tmp2 + B * (H + Hk) * D, B, 0, nthreads);
            for (int64_t b = 0; b < B; b++) {
                memcpy(qkv + b * QKV, tmp2 + b * H * D, sizeof(float) * H * D);
                memcpy(qkv + b * QKV + H * D, tmp2 + B * H * D + b * Hk * D, sizeof(float) * Hk * D);
                memcpy(qkv + b * QKV + (H + Hk) * D, tmp2 + B * (H + Hk) * D + b * Hk * D, sizeof(float) * Hk * D);
            }
        }
        for (int64_t b = 0; adapter && b < B; b++) {
            if (adapter[b] < 0) continue;
            const LoRA* e = lora + (adapter[b] * m->layers + l) * L_MODULES;
            float* row = qkv + b * QKV;
            lora_add(e + L_Q, xn + b * C, C, row, H * D);
            lora_add(e + L_K, xn + b * C, C, row + H * D, Hk * D);
            lora_add(e + L_V, xn + b * C, C, row + (H + Hk) * D, Hk * D);
        }
        #pragma omp parallel for num_threads(nthreads) if (wide)
        for (int64_t b = 0; b < B; b++) {
            float *qb = qkv + b * QKV, *kb = qb + H * D, *vb = kb + Hk * D;
            for (int64_t h = 0; h < H + Hk; h++) {  /* the query heads, then the key heads */
                float* head = qb + h * D;
                if (L->q_norm) rms_norm(head, h < H ? L->q_norm : L->k_norm, head, D, m->eps);
                if (half) rope(head, cs + b * half, sn + b * half, half);
            }
            memcpy(q + b * H * D, qb, sizeof(float) * H * D);
            for (int64_t h = 0; h < Hk; h++) {
                int64_t at = ((slot[b] * Hk + h) * max_len + pos[b]) * D;
                memcpy(kl + at, kb + h * D, sizeof(float) * D);
                memcpy(vl + at, vb + h * D, sizeof(float) * D);
            }
        }
        if (rows_attention(q, kl, vl, slot, lo, hi, att, B, Hk, G, D, max_len, m->scale, nthreads)) {
            free(buf);
            return -1;
        }
        m->matmul(L->o, att, tmp, B, 0, nthreads);
        for (int64_t b = 0; adapter && b < B; b++)
            if (adapter[b] >= 0)
                lora_add(lora + (adapter[b] * m->layers + l) * L_MODULES + L_O, att + b * H * D, H * D, tmp + b * C, C);
        #pragma omp parallel for num_threads(nthreads) if (wide)
        for (int64_t b = 0; b < B; b++) {
            for (int64_t i = 0; i < C; i++) x[b * C + i] += tmp[b * C + i];
            rms_norm(x + b * C, L->mlp_norm, xn + b * C, C, m->eps);
        }
        if (L->gate_up) {
            m->matmul(L->gate_up, xn, gu, B, 0, nthreads);
        } else {  /* gate rows, then up rows */
            m->matmul(L->gate, xn, gu, B, 0, nthreads);
            m->matmul(L->up, xn, gu + B * F, B, 0, nthreads);
        }
        #pragma omp parallel for num_threads(nthreads) if (wide)
        for (int64_t b = 0; b < B; b++) {
            float *gate = L->gate_up ? gu + b * 2 * F : gu + b * F;
            float *up = L->gate_up ? gate + F : gu + B * F + b * F;
            if (adapter && adapter[b] >= 0) {
                const LoRA* e = lora + (adapter[b] * m->layers + l) * L_MODULES;
                lora_add(e + L_GATE, xn + b * C, C, gate, F);
                lora_add(e + L_UP, xn + b * C, C, up, F);
            }
            float* out = hh + b * F;
            for (int64_t i = 0; i < F; i++) out[i] = gate[i] / (1.0f + expf(-gate[i])) * up[i];
        }
        m->matmul(L->down, hh, tmp, B, 0, nthreads);
        for (int64_t b = 0; adapter && b < B; b++)
            if (adapter[b] >= 0)
                lora_add(lora + (adapter[b] * m->layers + l) * L_MODULES + L_DOWN, hh + b * F, F, tmp + b * C, C);
        #pragma omp parallel for num_threads(nthreads) if (wide)
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
    }
    free(buf);
    return 0;
}

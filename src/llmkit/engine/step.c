/* A whole decode step of a Llama-family model in one call (llmkit.engine.step).
 *
 * Compiled after llmkit.cpu_attention's source (its decode_attention_f32 is the attention here)
 * and handed the block-format matrix product of llmkit.engine.quant as a function pointer, so each
 * kernel keeps one home. What runs per layer, for B rows of one new token each, all float32:
 *   rms_norm -> q|k|v (one stacked matrix) -> per-head q/k norms -> rotary embedding -> k, v into
 *   the cache -> attention -> o -> residual -> rms_norm -> gate|up (one stacked matrix) -> silu(gate)
 *   * up -> down -> residual.
 * The same steps as llmkit.model's modules in the same order; what differs is only where Python
 * would dispatch each small operation separately. Rows may share a cache slot at consecutive
 * positions (speculative decoding's check): every row's keys are written before any row attends,
 * and each row sees its slot's positions up to its own.
 */

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
    int64_t span = 1;
    for (int64_t b = 0; b < B; b++) {
        int64_t n = pos[b] + 1;
        if (m->window > 0 && n > m->window) n = m->window;
        if (n > span) span = n;
    }
    const int64_t work_size = B * Hk * (2 * G * D + D + G * span);
    float* buf = malloc(sizeof(float) * (B * (C + 2 * QKV + 2 * H * D + C + 3 * F + 2 * half) + work_size)
                        + sizeof(int64_t) * 2 * B);
    if (!buf) return -1;
    float *xn = buf, *qkv = xn + B * C, *q = qkv + B * QKV, *att = q + B * H * D, *tmp = att + B * H * D;
    float *gu = tmp + B * C, *hh = gu + B * 2 * F, *cs = hh + B * F, *sn = cs + B * half, *tmp2 = sn + B * half;
    float* work = tmp2 + B * QKV;
    int64_t *lo = (int64_t*)(work + work_size), *hi = lo + B;
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
        decode_attention_f32(q, kl, vl, slot, lo, hi, att, work, (int)B, (int)Hk, (int)G, (int)D, max_len, span,
                             m->scale);
        m->matmul(L->o, att, tmp, B, 0, nthreads);
        for (int64_t b = 0; adapter && b < B; b++)
            if (adapter[b] >= 0)
                lora_add(lora + (adapter[b] * m->layers + l) * L_MODULES + L_O, att + b * H * D, H * D, tmp + b * C, C);
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
        for (int64_t b = 0; b < B; b++) rms_norm(x + b * C, L->mlp_norm, xn + b * C, C, m->eps);
        if (L->gate_up) {
            m->matmul(L->gate_up, xn, gu, B, 0, nthreads);
        } else {  /* gate rows, then up rows */
            m->matmul(L->gate, xn, gu, B, 0, nthreads);
            m->matmul(L->up, xn, gu + B * F, B, 0, nthreads);
        }
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
        for (int64_t i = 0; i < B * C; i++) x[i] += tmp[i];
    }
    free(buf);
    return 0;
}

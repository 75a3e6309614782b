"""Decode attention on CPU: one query row per sequence against its cached keys, in a small C kernel.

PyTorch has no CPU kernel for this shape: 16 sequences x 3 kv heads make 48 small matrix
products of (length x 64) by (64 x 3) per layer, each paying oneDNN's fixed cost, and its
flash-attention kernel is built for long queries. This kernel walks each sequence's keys once,
for all the query heads that share them, in float32, over exactly the positions the sequence
sees (no mask, no copy of the cache), one (sequence, kv head) per OpenMP task. What it saved is
in bench/NOTES.md.

It is compiled on first use with the system's C compiler (``cc``, a second or two) into the
store's kernel folder and loaded with ctypes by ``llmkit.engine.native`` (no torch headers). Where
that fails (no compiler, another CPU, an unsafe kernel folder), ``available()`` is False and the
model keeps its torch path.
"""

from __future__ import annotations

import ctypes
import logging
import threading

import torch

from llmkit.engine import native

log = logging.getLogger(__name__)

_SOURCE = r"""
#include <stdint.h>
#include <math.h>

static inline float from_bf16(uint16_t x) { union { uint32_t u; float f; } v; v.u = (uint32_t)x << 16; return v.f; }
static inline uint16_t to_bf16(float f) {
    union { uint32_t u; float f; } v; v.f = f;
    if ((v.u & 0x7fffffffu) > 0x7f800000u) return (uint16_t)((v.u >> 16) | 0x40);  /* NaN stays NaN */
    return (uint16_t)((v.u + 0x7fffu + ((v.u >> 16) & 1u)) >> 16);  /* round to nearest even */
}

#define KERNEL(NAME, T, LOAD, STORE)                                                              \
void NAME(const T* q, const T* k, const T* v, const int64_t* slot, const int64_t* lo,           \
          const int64_t* hi, T* out, float* work, int B, int Hk, int G, int D, int64_t max_len,  \
          int64_t span, float scale) {                                                            \
    _Pragma("omp parallel for schedule(dynamic, 1)")                                              \
    for (int bh = 0; bh < B * Hk; bh++) {                                                         \
        int b = bh / Hk, h = bh % Hk;                                                             \
        int64_t n = hi[b] - lo[b];                                                                \
        const T* kb = k + ((slot[b] * Hk + h) * max_len + lo[b]) * D;                             \
        const T* vb = v + ((slot[b] * Hk + h) * max_len + lo[b]) * D;                             \
        const T* qb = q + (int64_t)bh * G * D;                                                    \
        float* qf = work + (int64_t)bh * (2 * G * D + D + G * span);  /* this task's scratch */   \
        float* acc = qf + G * D; float* row = acc + G * D; float* s = row + D;                   \
        for (int i = 0; i < G * D; i++) { qf[i] = LOAD(qb[i]) * scale; acc[i] = 0.0f; }          \
        for (int64_t l = 0; l < n; l++) {                                                         \
            for (int d = 0; d < D; d++) row[d] = LOAD(kb[l * D + d]);                             \
            for (int g = 0; g < G; g++) {                                                         \
                float dot = 0.0f;                                                                 \
                _Pragma("omp simd reduction(+:dot)")                                              \
                for (int d = 0; d < D; d++) dot += qf[g * D + d] * row[d];                        \
                s[g * n + l] = dot;                                                               \
            }                                                                                     \
        }                                                                                         \
        for (int g = 0; g < G; g++) {                                                             \
            float m = s[g * n], sum = 0.0f;  /* n >= 1: a query always sees its own key */       \
            for (int64_t l = 0; l < n; l++) m = s[g * n + l] > m ? s[g * n + l] : m;              \
            float* sg = s + g * n;                                                                \
            _Pragma("omp simd")                                                                   \
            for (int64_t l = 0; l < n; l++) sg[l] = expf(sg[l] - m);                              \
            for (int64_t l = 0; l < n; l++) sum += sg[l];                                         \
            float inv = 1.0f / sum;                                                               \
            for (int64_t l = 0; l < n; l++) sg[l] *= inv;                                         \
        }                                                                                         \
        for (int64_t l = 0; l < n; l++) {                                                         \
            for (int d = 0; d < D; d++) row[d] = LOAD(vb[l * D + d]);                             \
            for (int g = 0; g < G; g++) {                                                         \
                float p = s[g * n + l];                                                           \
                _Pragma("omp simd")                                                               \
                for (int d = 0; d < D; d++) acc[g * D + d] += p * row[d];                         \
            }                                                                                     \
        }                                                                                         \
        T* ob = out + (int64_t)bh * G * D;                                                        \
        for (int i = 0; i < G * D; i++) ob[i] = STORE(acc[i]);                                    \
    }                                                                                             \
}

#define ID(x) (x)
KERNEL(decode_attention_bf16, uint16_t, from_bf16, to_bf16)
KERNEL(decode_attention_f32, float, ID, ID)
"""

_lib = None
_tried = False
_lock = threading.Lock()
_ARGS = [ctypes.c_void_p] * 8 + [ctypes.c_int] * 4 + [ctypes.c_int64, ctypes.c_int64, ctypes.c_float]


def _compile() -> ctypes.CDLL | None:
    # -ffast-math: glibc's vector expf (libmvec) is only declared for it; the kernel has no
    # infinities or NaNs of its own to lose (the max starts from a real score)
    names = ("decode_attention_bf16", "decode_attention_f32")
    return native.load("decode_attention", _SOURCE, ("-march=native", "-ffast-math"),
                       {name: (_ARGS, None) for name in names})


def available() -> bool:
    """Whether the kernel is built and loaded (building it on the first call)."""
    global _lib, _tried
    if not _tried:
        with _lock:
            if not _tried:
                try:
                    _lib = _compile()
                except Exception as exc:  # any failure: keep the torch path
                    log.info("decode attention kernel unavailable: %s", exc)
                    _lib = None
                _tried = True
    return _lib is not None


def prepare(slots: torch.Tensor, positions: torch.Tensor, window: int | None, cache_slots: int,
            max_len: int, heads: int, kv_heads: int, head_dim: int) -> tuple:
    """Once per pass: each sequence's slot and its key range [lo, hi) for one query at
    ``positions`` (B,), checked against the cache's size (the kernel reads raw memory), and the
    kernel's float32 scratch, shared by the layers."""
    slots = slots.to(torch.int64).contiguous()
    hi = positions.to(torch.int64).reshape(-1) + 1
    lo = (hi - window).clamp(min=0) if window else torch.zeros_like(hi)
    if len(slots) != len(hi) or int(slots.min()) < 0 or int(slots.max()) >= cache_slots or int(hi.max()) > max_len:
        raise IndexError(f"slots or positions outside the cache ({cache_slots} slots x {max_len} positions)")
    span = int((hi - lo).max())
    g = heads // kv_heads
    work = torch.empty(len(slots) * kv_heads * (2 * g * head_dim + head_dim + g * span))
    return slots, lo.contiguous(), hi.contiguous(), work, span


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, ranges: tuple) -> torch.Tensor:
    """q (B, H, D), one query row per sequence; k_cache/v_cache one layer (slots, Hk, max_len, D),
    contiguous, of q's dtype (bfloat16 or float32); ranges from ``prepare``. Each sequence attends
    to its keys lo..hi-1 -> (B, H, D)."""
    b, h, d = q.shape
    hk, max_len = k_cache.shape[1], k_cache.shape[2]
    slots, lo, hi, work, span = ranges
    q = q.contiguous()
    out = torch.empty_like(q)
    fn = _lib.decode_attention_bf16 if q.dtype == torch.bfloat16 else _lib.decode_attention_f32
    fn(q.data_ptr(), k_cache.data_ptr(), v_cache.data_ptr(), slots.data_ptr(), lo.data_ptr(), hi.data_ptr(),
       out.data_ptr(), work.data_ptr(), b, hk, h // hk, d, max_len, span, d ** -0.5)
    return out

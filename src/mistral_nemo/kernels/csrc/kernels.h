/* CPU kernels for decoding: the one header of pool.c, matmul_float.c, matmul_quant.c,
 * attention.c, decode_step.c and argmax.c, built together into one library at first use
 * with -march=native.
 *
 * Decoding one token reads every weight once, so its speed is set by memory bandwidth.
 * torch's bf16 GEMV reaches about 2/3 of it on AVX-512 machines; the products here stream
 * each weight row once with independent accumulators and keep up with the memory. Rows are
 * shared by `threads` POSIX threads. Also here: products of up to a few dozen vectors
 * (`gemv`), and a whole decode step (`decode_step`).
 */
#ifndef MISTRAL_NEMO_KERNELS_H
#define MISTRAL_NEMO_KERNELS_H

#include <limits.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>
#if defined(__AVX512F__) || (defined(__AVX2__) && defined(__FMA__))
#include <immintrin.h>
#endif
/* AVX2 machines (with FMA: every AVX2 CPU but a few of 2013) get 8-wide paths for the fp32,
 * bf16, FP8, int8 and int4 products and so the decode step; the rest of the vector code
 * (fp32 tiles, attention, SiLU, argmax) is AVX-512's, with scalar loops elsewhere. */
#if !defined(__AVX512F__) && defined(__AVX2__) && defined(__FMA__)
#define MISTRAL_NEMO_AVX2 1
#endif
/* The int8 and int4 products take activations quantized to int8: VNNI's or AVX2's. */
#if defined(__AVX512VNNI__) || defined(MISTRAL_NEMO_AVX2)
#define MISTRAL_NEMO_INT8_DOT 1
#endif

/* ==== The interface. Python reads from here to the end marker with cffi (kernels/header.py):
 * the weight kinds, the structs of a decode step and the entry points come from this text
 * alone, so it holds plain C declarations: no macros, no includes. ==== */

/* The kinds of weights the products take (int4 and int8 weights' dtypes say too little). */
enum weight_kind { KIND_BF16 = 0, KIND_FP32 = 1, KIND_FP8 = 2, KIND_INT4 = 3, KIND_INT8 = 4 };

typedef struct {
    enum weight_kind kind;
    long rows, cols, group; /* group: int4's group size */
    const void *w;
    const void *scale;      /* int4: (scale, zero) fp16 [rows, groups, 2]; int8: fp32 [rows];
                               fp8: fp32, one per row or one for all; bf16, fp32: none */
    long scales;            /* fp8: how many scales (1 or rows) */
} linear_t;

typedef struct {
    const float *attention_norm, *ffn_norm;
    linear_t qkv[3], wo, gate_up[2], w2; /* q, k, v and gate, up: one fused layer or each */
    int n_qkv, n_gate_up;
} layer_t;

typedef struct {
    int n_layers, dim, hidden, heads, kv, hd;
    float eps;
    const layer_t *layers;
    const float *norm;      /* the final RMSNorm's weight */
} decoder_t;

typedef struct {            /* where layer 0's keys and values are (see attention_t) */
    float *k, *v;
    long layer_stride, slot_stride, head_stride;
    const long *blocks;     /* a paged cache's block table: position p is in slot
                               blocks[p / block_size] * block_size + p % block_size; or NULL:
                               slot p */
    long block_size;
} kv_layout_t;

/* The entry points that return a long return 0, or the size in bytes of a scratch
 * allocation that failed; the outputs are then unset (a decode step's caches may hold some
 * layers' keys and values at the new positions). */

/* 1 if this build has the vector path for `kind`, else 0 (the scalar loop is too slow). */
int gemv_vectorized(enum weight_kind kind);

/* 1 if fp32 products of many vectors run in tiles (AVX-512 builds), else 0: each (row,
 * vector) pair is then a dot product of its own, which beats torch's only for a few. */
int gemv_tiled(void);

/* Send the workers to sleep now rather than after their spin. */
void pool_sleep(void);

/* out [batch, rows] = x [batch, cols] @ w^T for bf16, fp32 or fp8 w (x bf16 for bf16 and
 * fp8). */
long gemv(const void *w, const void *x, float *out, long rows, long cols, long batch,
          enum weight_kind kind, int threads);

/* out [batch, rows] = int4 weights @ x [batch, cols]. */
long gemv_int4(const uint8_t *w, const float *x, const uint16_t *sz, float *out, long rows,
               long cols, long group, long batch, int threads);

/* out [batch, rows] = row_scale * (int8 weights @ x [batch, cols]); only in builds where
 * gemv_vectorized(KIND_INT8). */
long gemv_int8(const int8_t *w, const float *x, const float *row_scale, float *out,
               long rows, long cols, long batch, int threads);

/* out [rows, cols] = the int4 weights in fp32. */
void dequantize_int4(const uint8_t *w, const uint16_t *sz, float *out, long rows, long cols,
                     long group, int threads);

/* out[r] = the index of row r's largest value, as numpy's argmax gives it. */
void argmax_rows(const float *x, long rows, long cols, long *out, int threads);

/* Every layer of each sequence's new token, and the final norm, in place on x [batch, dim]. */
long decode_step(const decoder_t *m, long batch, const kv_layout_t *c, const long *pos,
                 const float *rot, float *x, int threads);

/* ==== End of the interface ==== */

/* ---- The worker pool (pool.c) ---------------------------------------------------------- */

/* Work split in units (rows of a product, tiles, attention spans) that threads claim a
 * chunk at a time; `each` does units first..end-1. */
typedef struct {
    long rows;          /* units 0..rows-1 */
    long chunk;         /* units per claim (0: CHUNK) */
    long next;          /* next unclaimed unit, taken `chunk` at a time by all threads */
    void (*each)(const void *ctx, long first, long end);
    const void *ctx;
} job_t;

/* Rows are claimed in small chunks rather than split in equal halves up front, so a thread
 * slowed by the rest of the machine does not leave the others idle at the end. */
enum { CHUNK = 64 };

/* Runs `job` on the calling thread and up to threads - 1 workers; returns when it is done. */
void run_threads(job_t *job, int threads);

/* ---- Scratch memory -------------------------------------------------------------------- */

/* malloc (or calloc, `zeroed`) that, on failure, notes the size asked in *failed (the
 * first failure of a call: its entry point returns it). */
static inline void *scratch(size_t count, size_t size, int zeroed, long *failed) {
    if (size > 0 && count > SIZE_MAX / size) { /* more bytes than there are addresses */
        if (*failed == 0) *failed = LONG_MAX;
        return NULL;
    }
    void *p = zeroed ? calloc(count, size) : malloc(count * size);
    if (p == NULL && count * size > 0 && *failed == 0) *failed = (long)(count * size);
    return p;
}

/* ---- Numbers shared by the files ------------------------------------------------------- */

static inline float bf16_to_f32(uint16_t h) {
    uint32_t u = (uint32_t)h << 16;
    float f;
    memcpy(&f, &u, 4);
    return f;
}

static inline float f16_to_f32(uint16_t h) {
#if defined(__F16C__) && (defined(__AVX512F__) || defined(MISTRAL_NEMO_AVX2)) /* immintrin.h */
    return _cvtsh_ss(h);
#else
    uint32_t sign = (uint32_t)(h & 0x8000) << 16, exp = (h >> 10) & 31, man = h & 0x3FF, u;
    if (exp == 31) { /* inf, nan */
        u = sign | 0x7F800000 | man << 13;
    } else if (exp > 0) {
        u = sign | (exp + 112) << 23 | man << 13;
    } else { /* zero, subnormal: man * 2^-24 */
        float f = (float)man * 0x1p-24f;
        return sign ? -f : f;
    }
    float f;
    memcpy(&f, &u, 4);
    return f;
#endif
}

static inline uint16_t f32_to_bf16(float f) { /* round to nearest even */
    uint32_t u;
    memcpy(&u, &f, 4);
    return (uint16_t)((u + 0x7FFF + ((u >> 16) & 1)) >> 16);
}

#if defined(MISTRAL_NEMO_AVX2)
static inline float sum8(__m256 v) {
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    return _mm_cvtss_f32(_mm_add_ss(h, _mm_movehdup_ps(h)));
}

/* 8 bf16 values to fp32: each is the top half of its float. */
static inline __m256 bf16x8_to_f32(const uint16_t *p) {
    return _mm256_castsi256_ps(
        _mm256_slli_epi32(_mm256_cvtepu16_epi32(_mm_loadu_si128((const __m128i *)p)), 16));
}

/* 8 float8_e4m3fn bytes to fp32: normal numbers by moving bits (the exponent rebiased by
 * +120), the 7 subnormals as m / 512. (NaN is not handled: the quantizer never makes it.) */
static inline __m256 fp8x8_to_f32(const uint8_t *p) {
    const __m256i b = _mm256_cvtepu8_epi32(_mm_loadl_epi64((const __m128i *)p));
    const __m256i em = _mm256_and_si256(b, _mm256_set1_epi32(0x7F));
    const __m256 normal = _mm256_castsi256_ps(
        _mm256_add_epi32(_mm256_slli_epi32(em, 20), _mm256_set1_epi32(120 << 23)));
    const __m256 sub = _mm256_mul_ps(_mm256_cvtepi32_ps(em), _mm256_set1_ps(1.f / 512));
    const __m256 small = _mm256_castsi256_ps(_mm256_cmpgt_epi32(_mm256_set1_epi32(8), em));
    const __m256i sign = _mm256_slli_epi32(_mm256_and_si256(b, _mm256_set1_epi32(0x80)), 24);
    return _mm256_or_ps(_mm256_blendv_ps(normal, sub, small), _mm256_castsi256_ps(sign));
}

/* Weights c..c+7 of an fp32, bf16 or fp8 row, as fp32. */
static inline __m256 load8(const void *w, long c, enum weight_kind kind) {
    if (kind == KIND_BF16) return bf16x8_to_f32((const uint16_t *)w + c);
    if (kind == KIND_FP8) return fp8x8_to_f32((const uint8_t *)w + c);
    return _mm256_loadu_ps((const float *)w + c);
}

/* The dot product of row w and fp32 x over their whole blocks of 8 (*end: where they end),
 * on four sums (one waits out each multiply-add). Inlined with a constant `kind`. */
static inline float dot8(const void *w, const float *x, long n, enum weight_kind kind,
                         long *end) {
    __m256 a0 = _mm256_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    long c = 0;
    for (; c + 32 <= n; c += 32) {
        a0 = _mm256_fmadd_ps(load8(w, c, kind), _mm256_loadu_ps(x + c), a0);
        a1 = _mm256_fmadd_ps(load8(w, c + 8, kind), _mm256_loadu_ps(x + c + 8), a1);
        a2 = _mm256_fmadd_ps(load8(w, c + 16, kind), _mm256_loadu_ps(x + c + 16), a2);
        a3 = _mm256_fmadd_ps(load8(w, c + 24, kind), _mm256_loadu_ps(x + c + 24), a3);
    }
    for (; c + 8 <= n; c += 8) a0 = _mm256_fmadd_ps(load8(w, c, kind), _mm256_loadu_ps(x + c), a0);
    *end = c;
    return sum8(_mm256_add_ps(_mm256_add_ps(a0, a1), _mm256_add_ps(a2, a3)));
}
#endif

static inline float dot_f32(const float *w, const float *x, long n) {
    long c = 0;
    float tail = 0.f;
#if defined(__AVX512F__)
    __m512 a0 = _mm512_setzero_ps(), a1 = a0, a2 = a0, a3 = a0;
    for (; c + 64 <= n; c += 64) {
        a0 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c), _mm512_loadu_ps(x + c), a0);
        a1 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 16), _mm512_loadu_ps(x + c + 16), a1);
        a2 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 32), _mm512_loadu_ps(x + c + 32), a2);
        a3 = _mm512_fmadd_ps(_mm512_loadu_ps(w + c + 48), _mm512_loadu_ps(x + c + 48), a3);
    }
    for (; c < n; c += 16) { /* the last 1..63 columns, the final block masked */
        __mmask16 m = n - c >= 16 ? 0xFFFF : (1u << (n - c)) - 1;
        a0 = _mm512_fmadd_ps(_mm512_maskz_loadu_ps(m, w + c), _mm512_maskz_loadu_ps(m, x + c), a0);
    }
    tail = _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(a0, a1), _mm512_add_ps(a2, a3)));
#elif defined(MISTRAL_NEMO_AVX2)
    tail = dot8(w, x, n, KIND_FP32, &c);
#endif
    for (; c < n; c++) tail += w[c] * x[c];
    return tail;
}

#if defined(__AVX512F__)
/* e^x for x in [-87, 88]: 2^n e^r with n = round(x / ln 2) and |r| <= ln(2) / 2, e^r by its
 * Taylor polynomial of degree 6 (relative error ~1e-7, about glibc's expf). */
static inline __m512 exp512(__m512 x) {
    x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.f)), _mm512_set1_ps(88.f));
    __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504f)),
                                    _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
    __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693145751953125f), x); /* ln 2, split */
    r = _mm512_fnmadd_ps(n, _mm512_set1_ps(1.428606765330187e-06f), r);
    __m512 p = _mm512_set1_ps(1.f / 720);
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 120));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 24));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f / 6));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(0.5f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.f));
    return _mm512_scalef_ps(p, n);
}
#endif

/* ---- Attention (attention.c), as the decode step plans and runs it -------------------- */

/* Attention of one new token, all in fp32 (one sequence): out[h] = softmax(q_h . K^T /
 * sqrt(hd)) V over positions 0..n-1, with the K and V of KV head h / (heads / kv). Position p
 * of KV head g lives at element offs[p] + g * head_stride of a cache: so one function serves
 * the contiguous cache [kv, max_len, hd] and the paged pool [slots, kv, hd].
 *
 * The work is split by KV head and by spans of positions (as in flash-decoding), so that
 * each K and V row is read once for all the query heads that share it, and a long context
 * keeps every thread busy. Each span leaves, per query head, its unnormalized output, its
 * highest score and its sum of exponentials; the spans are then merged. */
typedef struct {
    const float *q, *kc, *vc;
    const long *offs;
    long head_stride, n, span, spans;
    int heads, kv, hd;
    float *scores; /* [kv * spans, heads / kv, span] */
    float *part;   /* [kv * spans, heads / kv, hd + 2]: output, highest score, sum */
} attention_t;

/* The attention of every sequence of a step as one list of jobs: sequence i's are jobs
 * first[i] .. first[i + 1] - 1. */
typedef struct {
    const attention_t *seqs;
    const long *first;
    long n;
} attentions_t;

/* Below this many multiply-adds in all, attention stays on the calling thread; spans are at
 * least SPAN positions. */
enum { PARALLEL_ATTENTION = 1 << 16, SPAN = 128 };

/* How sequence `a` (its n, heads, kv and hd set) splits into spans: about four jobs per
 * thread, of SPAN positions or more. Returns the floats of scratch its jobs need. */
long plan_spans(attention_t *a, int threads);

/* Jobs first..end-1 of an attentions_t (`each` of a job_t). */
void attend_jobs(const void *all, long first, long end);

/* out[h] for each sequence's query head h: its spans' outputs merged. */
void merge_spans(const attention_t *a, float *out);

#endif

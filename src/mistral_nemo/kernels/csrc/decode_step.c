/* A whole decode step: every layer of each sequence's new token in one call (norms, the
 * products, RoPE, the cache writes, attention, SiLU, residuals).
 *
 * Decoding SmolLM2-sized models, the products take about half of a token's time; the rest
 * was some forty small torch ops per layer (norms, residuals, SiLU, views) and the Python
 * around them. Here they are loops over a few thousand floats. */
#include <math.h>

#include "kernels.h"

/* RoPE on q [heads, hd] and k [kv, hd] in place (interleaved pairs; `rot` holds cos, sin
 * for each pair), then k and v stored at slot offset `off` of the caches. */
static void rope_and_store(float *q, float *k, const float *v, float *kc, float *vc, long off,
                           long head_stride, int heads, int kv, int hd, const float *rot) {
    for (int h = 0; h < heads + kv; h++) {
        float *x = h < heads ? q + (long)h * hd : k + (long)(h - heads) * hd;
        for (int i = 0; i < hd / 2; i++) {
            float a = x[2 * i], b = x[2 * i + 1], c = rot[2 * i], s = rot[2 * i + 1];
            x[2 * i] = a * c - b * s;
            x[2 * i + 1] = a * s + b * c;
        }
    }
    for (int g = 0; g < kv; g++) {
        memcpy(kc + off + g * head_stride, k + (long)g * hd, sizeof(float) * hd);
        memcpy(vc + off + g * head_stride, v + (long)g * hd, sizeof(float) * hd);
    }
}

/* out [batch, rows] = x [batch, cols] @ W^T for x in fp32, as the layer's own Python
 * forward computes it; `xb` has room for batch * cols bf16 values (bf16 and fp8 weights take
 * x in bf16; the int kernels quantize each row of x on its own). */
static long linear(const linear_t *l, const float *x, float *out, long batch, uint16_t *xb,
                   int threads) {
    const long rows = l->rows, cols = l->cols;
    if (l->kind == KIND_INT4)
        return gemv_int4(l->w, x, l->scale, out, rows, cols, l->group, batch, threads);
#if defined(MISTRAL_NEMO_INT8_DOT)
    if (l->kind == KIND_INT8) return gemv_int8(l->w, x, l->scale, out, rows, cols, batch, threads);
#endif
    if (l->kind == KIND_FP32) return gemv(l->w, x, out, rows, cols, batch, KIND_FP32, threads);
    for (long c = 0; c < batch * cols; c++) xb[c] = f32_to_bf16(x[c]);
    const long failed = gemv(l->w, xb, out, rows, cols, batch, l->kind, threads);
    if (failed == 0 && l->kind == KIND_FP8) {
        const float *s = l->scale;
        for (long r = 0; r < batch * rows; r++) out[r] *= s[l->scales > 1 ? r % rows : 0];
    }
    return failed;
}

/* Layers ls[0..n) applied to the same x, their outputs one after another, each [batch,
 * rows]; `stacked` finds element e of sequence b's concatenated output there. */
static long linears(const linear_t *ls, int n, const float *x, float *out, long batch,
                    uint16_t *xb, int threads) {
    long failed = 0;
    for (int j = 0; j < n && failed == 0; out += batch * ls[j].rows, j++)
        failed = linear(&ls[j], x, out, batch, xb, threads);
    return failed;
}

static float *stacked(float *out, const linear_t *ls, int n, long batch, long b, long e) {
    int j = 0;
    for (; j < n - 1 && e >= ls[j].rows; j++) {
        out += batch * ls[j].rows;
        e -= ls[j].rows;
    }
    return out + b * ls[j].rows + e;
}

/* gate[i] = SiLU(gate[i]) * up[i] */
static void silu_times(float *gate, const float *up, long n) {
    long i = 0;
#if defined(__AVX512F__)
    for (; i + 16 <= n; i += 16) {
        __m512 g = _mm512_loadu_ps(gate + i);
        __m512 sig = _mm512_div_ps(_mm512_set1_ps(1.f),
                                   _mm512_add_ps(_mm512_set1_ps(1.f), exp512(_mm512_sub_ps(_mm512_setzero_ps(), g))));
        _mm512_storeu_ps(gate + i, _mm512_mul_ps(_mm512_mul_ps(g, sig), _mm512_loadu_ps(up + i)));
    }
#endif
    for (; i < n; i++) gate[i] = gate[i] / (1.f + expf(-gate[i])) * up[i];
}

static void rms_norm(const float *x, const float *weight, float *out, long n, float eps) {
    const float inv = 1.f / sqrtf(dot_f32(x, x, n) / (float)n + eps);
    for (long i = 0; i < n; i++) out[i] = x[i] * inv * weight[i];
}

/* x [batch, dim]: each sequence's new token's embedding in, the final norm's output out
 * (the LM head is left to the caller). Sequence b's keys and values of position pos[b] are
 * stored where c[b] says; rot[b] (hd floats) is RoPE at pos[b]. */
long decode_step(const decoder_t *m, long batch, const kv_layout_t *c, const long *pos,
                 const float *rot, float *x, int threads) {
    threads = threads < 1 ? 1 : threads;
    const long dim = m->dim, hidden = m->hidden, hd = m->hd, q_size = (long)m->heads * hd;
    const long kv_size = (long)m->kv * hd;
    const long widest = hidden > q_size ? (hidden > dim ? hidden : dim) : (q_size > dim ? q_size : dim);
    /* Every sequence's attention, planned once for all layers: its spans, its slot offsets
     * of its positions, and its jobs' place in one list (so that many short sequences still
     * make one call to the threads). */
    long failed = 0;
    attention_t *att_seq = scratch(batch, sizeof(attention_t), 1, &failed);
    long *first = scratch(batch + 1, sizeof(long), 0, &failed);
    float *h = NULL;
    uint16_t *xb = NULL;
    long *offs = NULL, offs_total = 0, scratch_total = 0, work = 0;
    if (failed) goto done;
    for (long b = 0; b < batch; b++) work += (pos[b] + 1) * q_size;
    const int att_threads = work < PARALLEL_ATTENTION ? 1 : threads;
    first[0] = 0;
    for (long b = 0; b < batch; b++) {
        attention_t *a = &att_seq[b];
        a->n = pos[b] + 1;
        a->heads = m->heads, a->kv = m->kv, a->hd = m->hd;
        a->head_stride = c[b].head_stride;
        scratch_total += plan_spans(a, att_threads);
        first[b + 1] = first[b] + a->kv * a->spans;
        offs_total += a->n;
    }
    h = scratch(batch * (dim + q_size + 2 * kv_size + q_size + dim + 3 * hidden) + scratch_total,
                sizeof(float), 0, &failed);
    xb = scratch(batch * widest, sizeof(uint16_t), 0, &failed);
    offs = scratch(offs_total, sizeof(long), 0, &failed);
    if (failed) goto done;
    float *qkv = h + batch * dim, *att = qkv + batch * (q_size + 2 * kv_size);
    float *o = att + batch * q_size, *gate_up = o + batch * dim;
    float *gate = gate_up + batch * 2 * hidden; /* [batch, hidden]: SiLU(gate) * up */
    for (long b = 0, at = 0, sc = 0; b < batch; at += att_seq[b].n, b++) {
        attention_t *a = &att_seq[b];
        const long bs = c[b].block_size;
        long *seq_offs = offs + at;
        for (long p = 0; p < a->n; p++)
            seq_offs[p] = (c[b].blocks ? c[b].blocks[p / bs] * bs + p % bs : p) * c[b].slot_stride;
        a->offs = seq_offs;
        a->scores = gate + batch * hidden + sc;
        a->part = a->scores + (long)a->heads * a->spans * a->span;
        sc += (long)a->heads * a->spans * (a->span + a->hd + 2);
    }
    const attentions_t all = {att_seq, first, batch};
    job_t att_job = {0};
    att_job.rows = first[batch];
    att_job.each = attend_jobs;
    att_job.ctx = &all;
    att_job.chunk = 1;
    for (int i = 0; i < m->n_layers; i++) {
        const layer_t *l = &m->layers[i];
        for (long b = 0; b < batch; b++)
            rms_norm(x + b * dim, l->attention_norm, h + b * dim, dim, m->eps);
        if ((failed = linears(l->qkv, l->n_qkv, h, qkv, batch, xb, threads))) goto done;
        for (long b = 0; b < batch; b++) {
            attention_t *a = &att_seq[b];
            const long layer = i * c[b].layer_stride;
            float *q = stacked(qkv, l->qkv, l->n_qkv, batch, b, 0);
            a->q = q, a->kc = c[b].k + layer, a->vc = c[b].v + layer;
            rope_and_store(q, stacked(qkv, l->qkv, l->n_qkv, batch, b, q_size),
                           stacked(qkv, l->qkv, l->n_qkv, batch, b, q_size + kv_size),
                           c[b].k + layer, c[b].v + layer, a->offs[pos[b]], a->head_stride,
                           m->heads, m->kv, m->hd, rot + b * hd);
        }
        att_job.next = 0;
        run_threads(&att_job, att_threads);
        for (long b = 0; b < batch; b++) merge_spans(&att_seq[b], att + b * q_size);
        if ((failed = linear(&l->wo, att, o, batch, xb, threads))) goto done;
        for (long d = 0; d < batch * dim; d++) x[d] += o[d];
        for (long b = 0; b < batch; b++)
            rms_norm(x + b * dim, l->ffn_norm, h + b * dim, dim, m->eps);
        if ((failed = linears(l->gate_up, l->n_gate_up, h, gate_up, batch, xb, threads)))
            goto done;
        for (long b = 0; b < batch; b++) {
            memcpy(gate + b * hidden, stacked(gate_up, l->gate_up, l->n_gate_up, batch, b, 0),
                   sizeof(float) * hidden);
            silu_times(gate + b * hidden,
                       stacked(gate_up, l->gate_up, l->n_gate_up, batch, b, hidden), hidden);
        }
        if ((failed = linear(&l->w2, gate, o, batch, xb, threads))) goto done;
        for (long d = 0; d < batch * dim; d++) x[d] += o[d];
    }
    for (long b = 0; b < batch; b++) rms_norm(x + b * dim, m->norm, h + b * dim, dim, m->eps);
    memcpy(x, h, sizeof(float) * batch * dim);
done:
    free(att_seq);
    free(first);
    free(offs);
    free(xb);
    free(h);
    return failed;
}

/* kvcache_compress.c: KVCache.compress, RPC's fused compression of one layer (score, select, compact in
 * place, the H2O accumulator along), and the per-device scratch it reuses, so that compressing
 * allocates nothing after the first time (on CUDA: no cudaMalloc/cudaFree, hence no device sync).
 */
#include "kvcache_core.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

static size_t scratch_align(size_t n) {
    return (n + 255) / 256 * 256;
}

/* The device's scratch slot with at least `need` bytes. A (re)allocation sizes it for the largest
 * compression of this layer's capacity (candidates [start, cap - window)), so a cache preallocated for
 * the schedule's peak allocates once per device and generation. NULL with an exception on failure. */
static rpc_scratch *reserve_scratch(KVCacheObject *self, rpc_layer *ly, const rpc_score_params *sp, int64_t A,
                                    size_t need, intptr_t stream) {
    const int slot = ly->dev_type == RPC_DEV_CUDA ? ly->dev_id + 1 : 0;
    if (slot >= self->n_scratch) {
        rpc_scratch *grown = PyMem_Realloc(self->scratch, (size_t)(slot + 1) * sizeof(rpc_scratch));
        if (grown == NULL) {
            PyErr_NoMemory();
            return NULL;
        }
        memset(grown + self->n_scratch, 0, (size_t)(slot + 1 - self->n_scratch) * sizeof(rpc_scratch));
        self->scratch = grown;
        self->n_scratch = slot + 1;
    }
    rpc_scratch *sc = &self->scratch[slot];
    if (sc->storage != NULL && sc->nbytes >= need) {
        return sc;
    }
    char err[RPC_ERR_LEN] = {0};
    int64_t nmax = ly->cap - self->window - sp->start;
    if (nmax < sp->end - sp->start) {
        nmax = sp->end - sp->start;
    }
    rpc_score_params big = *sp;
    big.end = sp->start + nmax;
    size_t ws = 0;
    if (ly->dev_type == RPC_DEV_CUDA) {
        int rc = rpc_cuda_score_workspace(ly->dev_id, &big, &ws, err);
        if (rc != RPC_OK) {
            rpc_raise_status(rc, err);
            return NULL;
        }
    }
    size_t want = ws + scratch_align((size_t)(self->B * A * nmax) * sizeof(float)) +
                  scratch_align((size_t)(self->B * A * nmax) * sizeof(int64_t));
    if (want < need) {
        want = need;
    }
    if (ly->dev_type == RPC_DEV_CUDA && sc->event == NULL) {
        int rc = rpc_cuda_event_create(ly->dev_id, &sc->event, err);
        if (rc != RPC_OK) {
            rpc_raise_status(rc, err);
            return NULL;
        }
    }
    /* Dropping the old block frees it; on CUDA cudaFree waits for the work that still uses it. */
    Py_CLEAR(sc->storage);
    sc->nbytes = 0;
    sc->storage = rpc_storage_new(kv_state(self), ly->dev_type, ly->dev_id, want, stream);
    if (sc->storage == NULL) {
        return NULL;
    }
    sc->nbytes = want;
    return sc;
}

void kv_release_scratch(KVCacheObject *self) {
    for (int i = 0; i < self->n_scratch; i++) {
        rpc_scratch *sc = &self->scratch[i];
        Py_CLEAR(sc->storage);
        sc->nbytes = 0;
        if (sc->event != NULL) {
            char err[RPC_ERR_LEN] = {0};
            (void)rpc_cuda_event_destroy(i - 1, sc->event, err); /* nothing to report it to */
            sc->event = NULL;
        }
        sc->used = 0;
    }
}

PyObject *kv_compress(PyObject *op, PyObject *args, PyObject *kwargs) {
    KVCacheObject *self = (KVCacheObject *)op;
    static char *kwlist[] = {"layer", "start", "keep", "aggregation", "pooling", "kernel_size", "stream",
                             "return_details", "scores_out", "indices_out", NULL};
    PyObject *layer_obj, *stream_obj = Py_None, *scores_out = Py_None, *indices_out = Py_None;
    long long start, keep;
    const char *aggregation = "all", *pooling = "avg";
    int kernel_size = 7, details = 0;
    if (!PyArg_ParseTupleAndKeywords(args, kwargs, "OLL|$ssiOpOO:compress", kwlist, &layer_obj, &start, &keep,
                                     &aggregation, &pooling, &kernel_size, &stream_obj, &details, &scores_out,
                                     &indices_out)) {
        return NULL;
    }
    ENTER(self);
    PyObject *result = NULL;
    rpc_result rs, ri; /* scores [B, A, N] and kept indices [B, A, keep]: out= tensors, details, or scratch */
    memset(&rs, 0, sizeof rs);
    memset(&ri, 0, sizeof ri);
    int64_t layer;
    intptr_t stream;
    if (kv_parse_layer(self, layer_obj, &layer) < 0 || rpc_parse_stream(stream_obj, &stream) < 0) {
        goto done;
    }
    rpc_layer *ly = &self->layers[layer];
    const int64_t W = self->window;
    if (W <= 0) {
        PyErr_SetString(PyExc_ValueError, "window: compress needs a cache built with window > 0, got window=0");
        goto done;
    }
    if (ly->storage == NULL) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds no tokens", (long long)layer);
        goto done;
    }
    int64_t nq = ly->q_recorded < W ? ly->q_recorded : W;
    if (nq != W) {
        PyErr_Format(PyExc_ValueError, "layer: layer %lld holds %lld recorded queries, compress needs window=%lld",
                     (long long)layer, (long long)nq, (long long)W);
        goto done;
    }
    if (start < 0) {
        PyErr_Format(PyExc_ValueError, "start: expected an int >= 0, got %lld", start);
        goto done;
    }
    const int64_t end = ly->length - W;
    const int64_t N = end - start;
    if (N < 1) {
        PyErr_Format(PyExc_ValueError,
                     "start: expected start < length - window = %lld (at least one candidate), got start=%lld",
                     (long long)end, start);
        goto done;
    }
    if (keep < 0 || keep > N) {
        PyErr_Format(PyExc_ValueError, "keep: expected 0 <= keep <= %lld (the number of candidates), got %lld",
                     (long long)N, keep);
        goto done;
    }
    rpc_aggregation agg;
    rpc_pooling pool;
    if (rpc_parse_aggregation(aggregation, &agg) < 0 || rpc_parse_pooling(pooling, &pool) < 0 ||
        rpc_check_kernel_size(kernel_size) < 0) {
        goto done;
    }
    const int64_t A = agg == RPC_AGG_ALL ? 1 : self->H;
    const size_t n_scores = (size_t)(self->B * A * N), n_idx = (size_t)(self->B * A * keep);
    const int dev = ly->dev_id;
    const int on_cuda = ly->dev_type == RPC_DEV_CUDA;
    char err[RPC_ERR_LEN] = {0};
    int rc;
    rpc_score_params sp;
    memset(&sp, 0, sizeof sp);
    sp.q = rpc_storage_data(ly->qstorage);
    sp.k = kv_layer_k(self, ly);
    sp.dtype = self->dtype;
    sp.B = self->B;
    sp.Hq = self->Hq;
    sp.Hkv = self->H;
    sp.R = W;
    sp.D = self->D;
    sp.q_stride[0] = self->Hq * W * self->D;
    sp.q_stride[1] = W * self->D;
    sp.q_stride[2] = self->D;
    sp.q_stride[3] = 1;
    kv_strides(self, ly->cap, sp.k_stride);
    sp.start = start;
    sp.end = end;
    sp.agg = agg;
    sp.pool = pool;
    sp.kernel_size = kernel_size;
    sp.scale = (float)(1.0 / sqrt((double)self->D));
    sp.raw = NULL;

    /* Scores and indices go to the caller's out= tensors when given, to fresh counted blocks with
     * return_details, and otherwise to the device's scratch block: [scores | indices | CUDA score
     * workspace], sized once for the largest compression the capacity allows and reused. */
    const int64_t sshape[3] = {self->B, A, N}, ishape[3] = {self->B, A, keep};
    if (rpc_result_init(&rs, ly->dev_type, dev, RPC_F32, 3, sshape) < 0 ||
        rpc_result_init(&ri, ly->dev_type, dev, RPC_I64, 3, ishape) < 0 ||
        rpc_result_use_out(&rs, scores_out, "scores_out", stream) < 0 ||
        rpc_result_use_out(&ri, indices_out, "indices_out", stream) < 0) {
        goto done;
    }
    if (details && (rpc_result_alloc(&rs, kv_state(self), 0, stream) < 0 ||
                    rpc_result_alloc(&ri, kv_state(self), 0, stream) < 0)) {
        goto done;
    }
    const size_t b_scores = scratch_align(n_scores * sizeof(float)), b_idx = scratch_align(n_idx * sizeof(int64_t));
    size_t b_ws = 0;
    if (on_cuda && (rc = rpc_cuda_score_workspace(dev, &sp, &b_ws, err)) != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    rpc_scratch *sc = reserve_scratch(self, ly, &sp, A, b_ws + b_scores + b_idx, stream);
    if (sc == NULL) {
        goto done;
    }
    unsigned char *sbase = (unsigned char *)rpc_storage_data(sc->storage);
    float *scores = rs.data != NULL ? (float *)rs.data : (float *)sbase;
    int64_t *indices = ri.data != NULL ? (int64_t *)ri.data : (int64_t *)(sbase + b_scores);
    if (on_cuda) {
        sp.workspace = sbase + b_scores + b_idx;
        sp.workspace_bytes = b_ws;
    } else {
        sp.workspace = NULL;
    }
    sp.out = scores;

    rpc_select_params sel;
    memset(&sel, 0, sizeof sel);
    sel.scores = scores;
    sel.rows = self->B * A;
    sel.N = N;
    sel.keep = keep;
    sel.indices = indices;

    rpc_compact_params cp;
    kv_compact_params(self, ly, start, end, keep, indices, A, A * keep, keep, &cp);
    rpc_acc_compact_params ap; /* the H2O accumulator follows the same indices, before the event is recorded */
    const int has_acc = kv_acc_params(self, ly, &cp, &ap);

    Py_BEGIN_ALLOW_THREADS
    if (on_cuda) {
        /* The scratch may still be in use by work queued on another stream: order, don't wait. */
        rc = (sc->used && sc->stream != stream) ? rpc_cuda_stream_wait_event(dev, (void *)stream, sc->event, err)
                                                : RPC_OK;
        if (rc == RPC_OK) {
            rc = rpc_cuda_score(dev, &sp, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cuda_select(dev, &sel, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cuda_compact(dev, &cp, (void *)stream, err);
        }
        if (rc == RPC_OK && has_acc) {
            rc = rpc_cuda_compact_acc(dev, &ap, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cuda_event_record(dev, sc->event, (void *)stream, err);
        }
        if (rc == RPC_OK) {
            sc->stream = stream;
            sc->used = 1;
        }
    } else {
        rc = rpc_cpu_score(&sp, err);
        if (rc == RPC_OK) {
            rc = rpc_cpu_select(&sel, err);
        }
        if (rc == RPC_OK) {
            rc = rpc_cpu_compact(&cp, err);
        }
        if (rc == RPC_OK && has_acc) {
            rc = rpc_cpu_compact_acc(&ap, err);
        }
    }
    Py_END_ALLOW_THREADS
    if (rc != RPC_OK) {
        rpc_raise_status(rc, err);
        goto done;
    }
    ly->length = start + keep + W;
    if (kv_sync_lengths(self, ly, stream) < 0) {
        goto done;
    }
    if (!details) {
        result = PyLong_FromLongLong((long long)ly->length);
        goto done;
    }
    {
        PyObject *s_obj = rpc_result_take(&rs, kv_state(self), 0);
        PyObject *i_obj = s_obj ? rpc_result_take(&ri, kv_state(self), 0) : NULL;
        if (i_obj == NULL) {
            Py_XDECREF(s_obj);
            goto done;
        }
        result = Py_BuildValue("(LNN)", (long long)ly->length, s_obj, i_obj);
    }
done:
    rpc_result_release(&rs);
    rpc_result_release(&ri);
    kv_leave(self);
    return result;
}

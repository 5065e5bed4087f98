/*
 * The engine's only C: a thin layer over oneDNN 2.6's matmul primitive.
 *
 * oneDNN 2.x passes `dnnl_memory_desc_t` by value, a ~1 KB struct whose layout the Rust side
 * would otherwise have to mirror by hand; here the compiler checks it against the installed
 * header. Callers serialise every call (one engine, one stream, and oneDNN's own OpenMP pool
 * already uses every thread).
 */
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Element types, as numbered by the Rust side. */
enum { NV_F32 = 0, NV_BF16 = 1, NV_F16 = 2 };
/* Fused after the product and its bias (oneDNN post-ops, computed on the f32 accumulator before
 * the result is rounded to the dtype): an activation, then a product with or a sum with a second
 * (m × n) operand given per call. */
enum { NV_NO_ACTIVATION = 0, NV_SILU = 1, NV_GELU_ERF = 2 };
enum { NV_NO_OPERAND = 0, NV_MUL = 1, NV_ADD = 2 };

static dnnl_engine_t engine;
static dnnl_stream_t stream;

struct nv_matmul {
    dnnl_data_type_t dt;
    int64_t n, k;
    /* The weights, reordered once into the layout oneDNN chose for them, in `weights_buffer`. */
    dnnl_memory_desc_t weights_md;
    dnnl_memory_t weights;
    void *weights_buffer;
    /* f32 bias (1 × n), or NULL. */
    dnnl_memory_t bias;
    int activation, operand;
    /* The primitive for the last row count: a pass feeds every layer the same count. */
    int64_t cached_m;
    dnnl_primitive_t cached;
};

static dnnl_data_type_t data_type(int dt) {
    switch (dt) {
    case NV_F32: return dnnl_f32;
    case NV_BF16: return dnnl_bf16;
    case NV_F16: return dnnl_f16;
    default: return dnnl_data_type_undef;
    }
}

static dnnl_status_t plain_md(dnnl_memory_desc_t *md, int64_t rows, int64_t cols, dnnl_data_type_t dt,
                              dnnl_format_tag_t tag) {
    dnnl_dims_t dims = {rows, cols};
    return dnnl_memory_desc_init_by_tag(md, 2, dims, dt, tag);
}

/* Copies the name of the implementation oneDNN picked for `pd` into `impl` (`impl_len` bytes). */
static void impl_name(const_dnnl_primitive_desc_t pd, char *impl, size_t impl_len) {
    const char *name = "";
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name);
    strncpy(impl, name, impl_len - 1);
    impl[impl_len - 1] = '\0';
}

/*
 * oneDNN keeps up to 1024 primitives by default, each with its JIT-compiled code: measured ~70 MB
 * of RSS after passes of 200 different row counts. Every projection keeps the primitive for its
 * last row count, and the layers' projections share a few shapes, so a few dozen entries serve
 * as well (same speed measured at 64) and bound that memory. The environment still overrides.
 */
#define PRIMITIVE_CACHE_CAPACITY 64

int nv_onednn_init(void) {
    dnnl_status_t s;
    if (!getenv("ONEDNN_PRIMITIVE_CACHE_CAPACITY") && !getenv("DNNL_PRIMITIVE_CACHE_CAPACITY")) {
        s = dnnl_set_primitive_cache_capacity(PRIMITIVE_CACHE_CAPACITY);
        if (s != dnnl_success) return s;
    }
    s = dnnl_engine_create(&engine, dnnl_cpu, 0);
    if (s != dnnl_success) return s;
    s = dnnl_stream_create(&stream, engine, dnnl_stream_default_flags);
    if (s != dnnl_success) dnnl_engine_destroy(engine);
    return s;
}

void nv_onednn_set_threads(int threads) { omp_set_num_threads(threads); }

/* Post-ops for an activation and a second operand (see the enums above). */
static dnnl_status_t post_ops_attr(dnnl_primitive_attr_t *attr, dnnl_data_type_t dt, int64_t m, int64_t n,
                                   int activation, int operand) {
    dnnl_post_ops_t ops = NULL;
    dnnl_status_t s;
    *attr = NULL;
    if (activation == NV_NO_ACTIVATION && operand == NV_NO_OPERAND) return dnnl_success;
    if ((s = dnnl_primitive_attr_create(attr)) != dnnl_success) return s;
    if ((s = dnnl_post_ops_create(&ops)) != dnnl_success) goto out;
    if (activation != NV_NO_ACTIVATION) {
        /* SiLU is oneDNN's swish with alpha 1: x·sigmoid(x). */
        dnnl_alg_kind_t alg = activation == NV_SILU ? dnnl_eltwise_swish : dnnl_eltwise_gelu_erf;
        if ((s = dnnl_post_ops_append_eltwise(ops, 1.0f, alg, 1.0f, 0.0f)) != dnnl_success) goto out;
    }
    if (operand != NV_NO_OPERAND) {
        dnnl_memory_desc_t operand_md;
        if ((s = plain_md(&operand_md, m, n, dt, dnnl_ab)) != dnnl_success) goto out;
        if ((s = dnnl_post_ops_append_binary(ops, operand == NV_MUL ? dnnl_binary_mul : dnnl_binary_add, &operand_md))
            != dnnl_success)
            goto out;
    }
    s = dnnl_primitive_attr_set_post_ops(*attr, ops);
out:
    if (ops) dnnl_post_ops_destroy(ops);
    if (s != dnnl_success && *attr) {
        dnnl_primitive_attr_destroy(*attr);
        *attr = NULL;
    }
    return s;
}

/* A matmul primitive descriptor for (m × k) · weights (+ bias) → (m × n), row-major src and dst. */
static dnnl_status_t matmul_pd(dnnl_primitive_desc_t *pd, dnnl_data_type_t dt, int64_t m, int64_t n, int64_t k,
                               const dnnl_memory_desc_t *weights_md, int has_bias, int activation, int operand) {
    dnnl_memory_desc_t src, dst, bias;
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr;
    dnnl_status_t s;
    if ((s = plain_md(&src, m, k, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = plain_md(&dst, m, n, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = plain_md(&bias, 1, n, dnnl_f32, dnnl_ab)) != dnnl_success) return s;
    if ((s = dnnl_matmul_desc_init(&desc, &src, weights_md, has_bias ? &bias : NULL, &dst)) != dnnl_success) return s;
    if ((s = post_ops_attr(&attr, dt, m, n, activation, operand)) != dnnl_success) return s;
    s = dnnl_primitive_desc_create(pd, &desc, attr, engine, NULL);
    if (attr) dnnl_primitive_attr_destroy(attr);
    return s;
}

/* One argument of `run`: a caller-owned buffer `data` described by `md`, or a memory object. */
struct run_arg {
    int name;
    const dnnl_memory_desc_t *md;
    const void *data;
    dnnl_memory_t memory;
};

#define MAX_RUN_ARGS 5
/* x86-64's transparent huge page. */
#define HUGE_PAGE_BYTES ((size_t)2 << 20)

/* Executes `prim` on `count` arguments, wrapping the caller-owned buffers in memory objects for
 * the call, and waits for it. */
static dnnl_status_t run(dnnl_primitive_t prim, int count, const struct run_arg *args) {
    dnnl_exec_arg_t exec[MAX_RUN_ARGS];
    dnnl_memory_t wrapped[MAX_RUN_ARGS] = {NULL};
    dnnl_status_t s = dnnl_success;
    int i;
    for (i = 0; i < count && s == dnnl_success; i++) {
        exec[i].arg = args[i].name;
        if (args[i].memory) {
            exec[i].memory = args[i].memory;
        } else {
            s = dnnl_memory_create(&wrapped[i], args[i].md, engine, (void *)args[i].data);
            exec[i].memory = wrapped[i];
        }
    }
    if (s == dnnl_success) s = dnnl_primitive_execute(prim, stream, count, exec);
    if (s == dnnl_success) s = dnnl_stream_wait(stream);
    for (i = 0; i < count; i++)
        if (wrapped[i]) dnnl_memory_destroy(wrapped[i]);
    return s;
}

/* Runs a matmul `prim` on caller-owned buffers; `operand` (m × n) is the binary post-op's, if any,
 * at post-op index `operand_index`. */
static dnnl_status_t execute(dnnl_primitive_t prim, dnnl_data_type_t dt, int64_t m, int64_t n, int64_t k,
                             const void *src, dnnl_memory_t weights, dnnl_memory_t bias, const void *operand,
                             int operand_index, void *dst) {
    dnnl_memory_desc_t src_md, dst_md;
    struct run_arg args[MAX_RUN_ARGS];
    int count = 0;
    dnnl_status_t s;
    if ((s = plain_md(&src_md, m, k, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = plain_md(&dst_md, m, n, dt, dnnl_ab)) != dnnl_success) return s;
    args[count++] = (struct run_arg){DNNL_ARG_SRC, &src_md, src, NULL};
    args[count++] = (struct run_arg){DNNL_ARG_WEIGHTS, NULL, NULL, weights};
    args[count++] = (struct run_arg){DNNL_ARG_DST, &dst_md, dst, NULL};
    if (bias) args[count++] = (struct run_arg){DNNL_ARG_BIAS, NULL, NULL, bias};
    /* Same shape and dtype as dst. */
    if (operand)
        args[count++] =
            (struct run_arg){DNNL_ARG_ATTR_MULTIPLE_POST_OP(operand_index) | DNNL_ARG_SRC_1, &dst_md, operand, NULL};
    return run(prim, count, args);
}

/*
 * `bytes` for packed weights, aligned to a huge page and advised to be backed by huge pages
 * where the kernel allows it (transparent_hugepage "madvise", Debian's default, or "always"). A
 * few-row pass streams every weight from memory once; with 4 KiB pages each 4 KiB costs a TLB
 * miss, and a bf16 query ran ~4 % faster on huge pages. The tail past the last whole huge page
 * keeps small pages, so no memory is added (the alignment may leave up to 2 MiB of address
 * space unused in front of a large buffer; it is never touched, so never resident).
 */
static void *huge_page_buffer(size_t bytes) {
    void *buffer = NULL;
    if (posix_memalign(&buffer, HUGE_PAGE_BYTES, bytes ? bytes : 1) != 0) return NULL;
    if (bytes >= HUGE_PAGE_BYTES) madvise(buffer, bytes / HUGE_PAGE_BYTES * HUGE_PAGE_BYTES, MADV_HUGEPAGE);
    return buffer;
}

/*
 * Packs `weight` (n rows of k, row-major: a PyTorch Linear's layout, i.e. the k × n operand in
 * "ba" order) into the layout oneDNN prefers for a matmul of `reference_m` rows, and writes the
 * name of the implementation it picked into `impl` (so the caller can tell a native kernel from
 * an emulated or reference one). That layout serves every other row count too. `bias` (n f32)
 * may be NULL; `activation` and `operand` choose the fused post-ops.
 */
int nv_matmul_create(int dt_id, int64_t n, int64_t k, const void *weight, const float *bias, int activation,
                     int operand, int64_t reference_m, struct nv_matmul **out, char *impl, size_t impl_len) {
    dnnl_data_type_t dt = data_type(dt_id);
    dnnl_memory_desc_t any_md, plain_weights_md;
    dnnl_primitive_desc_t pd = NULL, reorder_pd = NULL;
    dnnl_primitive_t reorder = NULL;
    struct nv_matmul *mm = NULL;
    dnnl_status_t s;

    *out = NULL;
    if ((s = plain_md(&any_md, k, n, dt, dnnl_format_tag_any)) != dnnl_success) return s;
    if ((s = matmul_pd(&pd, dt, reference_m, n, k, &any_md, bias != NULL, activation, operand)) != dnnl_success)
        return s;
    impl_name(pd, impl, impl_len);

    mm = calloc(1, sizeof *mm);
    if (!mm) { s = dnnl_out_of_memory; goto out; }
    mm->dt = dt;
    mm->n = n;
    mm->k = k;
    mm->cached_m = -1;
    mm->activation = activation;
    mm->operand = operand;
    if (bias) {
        dnnl_memory_desc_t bias_md;
        void *data;
        if ((s = plain_md(&bias_md, 1, n, dnnl_f32, dnnl_ab)) != dnnl_success) goto out;
        if ((s = dnnl_memory_create(&mm->bias, &bias_md, engine, DNNL_MEMORY_ALLOCATE)) != dnnl_success) goto out;
        if ((s = dnnl_memory_get_data_handle(mm->bias, &data)) != dnnl_success) goto out;
        memcpy(data, bias, (size_t)n * sizeof(float));
    }
    mm->weights_md = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    if (!(mm->weights_buffer = huge_page_buffer(dnnl_memory_desc_get_size(&mm->weights_md)))) {
        s = dnnl_out_of_memory;
        goto out;
    }
    if ((s = dnnl_memory_create(&mm->weights, &mm->weights_md, engine, mm->weights_buffer)) != dnnl_success) goto out;
    if ((s = plain_md(&plain_weights_md, k, n, dt, dnnl_ba)) != dnnl_success) goto out;
    if ((s = dnnl_reorder_primitive_desc_create(&reorder_pd, &plain_weights_md, engine, &mm->weights_md, engine, NULL))
        != dnnl_success)
        goto out;
    if ((s = dnnl_primitive_create(&reorder, reorder_pd)) != dnnl_success) goto out;
    {
        struct run_arg args[2] = {{DNNL_ARG_FROM, &plain_weights_md, weight, NULL},
                                  {DNNL_ARG_TO, NULL, NULL, mm->weights}};
        s = run(reorder, 2, args);
    }
out:
    if (reorder) dnnl_primitive_destroy(reorder);
    if (reorder_pd) dnnl_primitive_desc_destroy(reorder_pd);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (s == dnnl_success) {
        *out = mm;
    } else if (mm) {
        if (mm->weights) dnnl_memory_destroy(mm->weights);
        if (mm->bias) dnnl_memory_destroy(mm->bias);
        free(mm->weights_buffer);
        free(mm);
    }
    return s;
}

/* dst (m × n) = post-ops(src (m × k) · packed weights + bias), all in the matmul's element type;
 * `operand` (m × n) is the second operand of the fused product or sum, if the matmul has one. */
int nv_matmul_run(struct nv_matmul *mm, int64_t m, const void *src, const void *operand, void *dst) {
    dnnl_status_t s;
    if (mm->cached_m != m) {
        dnnl_primitive_desc_t pd;
        dnnl_primitive_t prim;
        if ((s = matmul_pd(&pd, mm->dt, m, mm->n, mm->k, &mm->weights_md, mm->bias != NULL, mm->activation,
                           mm->operand))
            != dnnl_success)
            return s;
        s = dnnl_primitive_create(&prim, pd);
        dnnl_primitive_desc_destroy(pd);
        if (s != dnnl_success) return s;
        if (mm->cached) dnnl_primitive_destroy(mm->cached);
        mm->cached = prim;
        mm->cached_m = m;
    }
    if ((mm->operand != NV_NO_OPERAND) != (operand != NULL)) return dnnl_invalid_arguments;
    /* The binary post-op follows the activation when there is one. */
    return execute(mm->cached, mm->dt, m, mm->n, mm->k, src, mm->weights, mm->bias, operand,
                   mm->activation != NV_NO_ACTIVATION, dst);
}

void nv_matmul_free(struct nv_matmul *mm) {
    if (!mm) return;
    if (mm->cached) dnnl_primitive_destroy(mm->cached);
    if (mm->bias) dnnl_memory_destroy(mm->bias);
    dnnl_memory_destroy(mm->weights);
    free(mm->weights_buffer);
    free(mm);
}

/*
 * f32 dst (m × n) = src (m × k) · weight, with `weight` given per call as n rows of k
 * (the path for 16-bit weights on CPUs without a native 16-bit kernel: the caller widens them
 * into a reused buffer). oneDNN's primitive cache makes the repeated creation cheap.
 */
int nv_matmul_plain_f32(int64_t m, int64_t n, int64_t k, const float *src, const float *weight, float *dst) {
    dnnl_memory_desc_t weights_md;
    dnnl_primitive_desc_t pd;
    dnnl_primitive_t prim;
    dnnl_memory_t weights;
    dnnl_status_t s;
    if ((s = plain_md(&weights_md, k, n, dnnl_f32, dnnl_ba)) != dnnl_success) return s;
    if ((s = matmul_pd(&pd, dnnl_f32, m, n, k, &weights_md, 0, NV_NO_ACTIVATION, NV_NO_OPERAND)) != dnnl_success)
        return s;
    s = dnnl_primitive_create(&prim, pd);
    dnnl_primitive_desc_destroy(pd);
    if (s != dnnl_success) return s;
    if ((s = dnnl_memory_create(&weights, &weights_md, engine, (void *)weight)) == dnnl_success) {
        s = execute(prim, dnnl_f32, m, n, k, src, weights, NULL, NULL, 0, dst);
        dnnl_memory_destroy(weights);
    }
    dnnl_primitive_destroy(prim);
    return s;
}

/* Creates the primitive of `pd` (destroying `pd`), runs it on `count` caller-owned buffers and
 * destroys it (oneDNN's primitive cache keeps its compiled code for the next call of the same
 * shape). */
static dnnl_status_t run_pd(dnnl_primitive_desc_t pd, int count, const struct run_arg *args) {
    dnnl_primitive_t prim;
    dnnl_status_t s = dnnl_primitive_create(&prim, pd);
    dnnl_primitive_desc_destroy(pd);
    if (s != dnnl_success) return s;
    s = run(prim, count, args);
    dnnl_primitive_destroy(prim);
    return s;
}

/* `run_pd` for the operation `desc`. */
static dnnl_status_t run_once(const_dnnl_op_desc_t desc, dnnl_primitive_attr_t attr, int count,
                              const struct run_arg *args) {
    dnnl_primitive_desc_t pd;
    dnnl_status_t s = dnnl_primitive_desc_create(&pd, desc, attr, engine, NULL);
    return s != dnnl_success ? s : run_pd(pd, count, args);
}

/* Softmax along `axis` of `src` (described by `md`) into `dst`, which may be `src`. */
static dnnl_status_t softmax(const dnnl_memory_desc_t *md, int axis, const void *src, void *dst) {
    dnnl_softmax_desc_t desc;
    dnnl_status_t s = dnnl_softmax_forward_desc_init(&desc, dnnl_forward_inference, md, axis);
    if (s != dnnl_success) return s;
    {
        struct run_arg args[2] = {{DNNL_ARG_SRC, md, src, NULL}, {DNNL_ARG_DST, md, dst, NULL}};
        return run_once(&desc, NULL, 2, args);
    }
}

/* Softmax of each row of contiguous (rows × cols) `src` of element type `dt` into `dst` (computed
 * in f32 whatever `dt`, rounded once). */
int nv_softmax(int dt, int64_t rows, int64_t cols, const void *src, void *dst) {
    dnnl_memory_desc_t md;
    dnnl_status_t s = plain_md(&md, rows, cols, data_type(dt), dnnl_ab);
    return s != dnnl_success ? s : softmax(&md, 1, src, dst);
}

/*
 * Attention of `g` heads for each of `b` rows, in f32: softmax(scale · q·kᵀ + key_bias) · v.
 * q, out: (b, g, m, d); k, v: (kv_b, g, n, d), kv_b = b, or 1 for keys shared by every row; all
 * contiguous. k is read transposed where it lies. key_bias: (b, n), added to every query row of
 * its batch row, or NULL. The scale and the bias are fused into the first product and the
 * softmax runs in place, so the scores (`scores`, the caller's (b, g, m, n) scratch) are
 * written once and read twice.
 */
int nv_attention_f32(int64_t b, int64_t kv_b, int64_t g, int64_t m, int64_t n, int64_t d, float scale,
                     const float *q, const float *k, const float *v, const float *key_bias, float *scores,
                     float *out) {
    dnnl_memory_desc_t q_md, kt_md, v_md, scores_md, out_md, bias_md;
    dnnl_dims_t q_dims = {b, g, m, d}, kt_dims = {kv_b, g, d, n}, v_dims = {kv_b, g, n, d};
    dnnl_dims_t scores_dims = {b, g, m, n}, bias_dims = {b, 1, 1, n};
    dnnl_matmul_desc_t desc;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    dnnl_status_t s;
    if ((s = dnnl_memory_desc_init_by_tag(&q_md, 4, q_dims, dnnl_f32, dnnl_abcd)) != dnnl_success) return s;
    if ((s = dnnl_memory_desc_init_by_tag(&out_md, 4, q_dims, dnnl_f32, dnnl_abcd)) != dnnl_success) return s;
    /* (kv_b, g, n, d) row-major is kᵀ (kv_b, g, d, n) with its last two axes swapped. */
    if ((s = dnnl_memory_desc_init_by_tag(&kt_md, 4, kt_dims, dnnl_f32, dnnl_abdc)) != dnnl_success) return s;
    if ((s = dnnl_memory_desc_init_by_tag(&v_md, 4, v_dims, dnnl_f32, dnnl_abcd)) != dnnl_success) return s;
    if ((s = dnnl_memory_desc_init_by_tag(&scores_md, 4, scores_dims, dnnl_f32, dnnl_abcd)) != dnnl_success) return s;
    if ((s = dnnl_memory_desc_init_by_tag(&bias_md, 4, bias_dims, dnnl_f32, dnnl_abcd)) != dnnl_success) return s;

    if ((s = dnnl_primitive_attr_create(&attr)) != dnnl_success) return s;
    if ((s = dnnl_post_ops_create(&ops)) != dnnl_success) goto out;
    if ((s = dnnl_post_ops_append_eltwise(ops, 1.0f, dnnl_eltwise_linear, scale, 0.0f)) != dnnl_success) goto out;
    if (key_bias && (s = dnnl_post_ops_append_binary(ops, dnnl_binary_add, &bias_md)) != dnnl_success) goto out;
    if ((s = dnnl_primitive_attr_set_post_ops(attr, ops)) != dnnl_success) goto out;
    if ((s = dnnl_matmul_desc_init(&desc, &q_md, &kt_md, NULL, &scores_md)) != dnnl_success) goto out;
    {
        struct run_arg args[4] = {{DNNL_ARG_SRC, &q_md, q, NULL},
                                  {DNNL_ARG_WEIGHTS, &kt_md, k, NULL},
                                  {DNNL_ARG_DST, &scores_md, scores, NULL},
                                  {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, &bias_md, key_bias, NULL}};
        if ((s = run_once(&desc, attr, key_bias ? 4 : 3, args)) != dnnl_success) goto out;
    }
    if ((s = softmax(&scores_md, 3, scores, scores)) != dnnl_success) goto out;
    if ((s = dnnl_matmul_desc_init(&desc, &scores_md, &v_md, NULL, &out_md)) != dnnl_success) goto out;
    {
        struct run_arg args[3] = {{DNNL_ARG_SRC, &scores_md, scores, NULL},
                                  {DNNL_ARG_WEIGHTS, &v_md, v, NULL},
                                  {DNNL_ARG_DST, &out_md, out, NULL}};
        s = run_once(&desc, NULL, 3, args);
    }
out:
    if (ops) dnnl_post_ops_destroy(ops);
    dnnl_primitive_attr_destroy(attr);
    return s;
}

/* The reorder of an `ndims` array laid out by `src_strides` into a contiguous one (descriptors in
 * `src_md`, `dst_md`). */
static dnnl_status_t reorder_pd(dnnl_primitive_desc_t *pd, int ndims, const int64_t *dims, int src_dt,
                                const int64_t *src_strides, int dst_dt, dnnl_memory_desc_t *src_md,
                                dnnl_memory_desc_t *dst_md) {
    dnnl_dims_t d, strides, dst_strides;
    dnnl_status_t s;
    int i;
    if (ndims < 1 || ndims > DNNL_MAX_NDIMS) return dnnl_invalid_arguments;
    for (i = ndims - 1; i >= 0; i--) {
        d[i] = dims[i];
        strides[i] = src_strides[i];
        dst_strides[i] = i == ndims - 1 ? 1 : dst_strides[i + 1] * dims[i + 1];
    }
    if ((s = dnnl_memory_desc_init_by_strides(src_md, ndims, d, data_type(src_dt), strides)) != dnnl_success) return s;
    if ((s = dnnl_memory_desc_init_by_strides(dst_md, ndims, d, data_type(dst_dt), dst_strides)) != dnnl_success)
        return s;
    return dnnl_reorder_primitive_desc_create(pd, src_md, engine, dst_md, engine, NULL);
}

/*
 * Copies the `ndims`-dimensional array `src` (element type `src_dt`, laid out by `src_strides`, in
 * elements) into contiguous row-major `dst` of type `dst_dt`: a permutation or a slice and a
 * dtype conversion in one pass (oneDNN's reorder).
 */
int nv_reorder(int ndims, const int64_t *dims, int src_dt, const int64_t *src_strides, const void *src, int dst_dt,
               void *dst) {
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_primitive_desc_t pd;
    dnnl_status_t s = reorder_pd(&pd, ndims, dims, src_dt, src_strides, dst_dt, &src_md, &dst_md);
    if (s != dnnl_success) return s;
    {
        struct run_arg args[2] = {{DNNL_ARG_FROM, &src_md, src, NULL}, {DNNL_ARG_TO, &dst_md, dst, NULL}};
        return run_pd(pd, 2, args);
    }
}

/* Writes into `impl` the implementation oneDNN picks for reordering heads out of a projection's
 * output (a transposed slice) from `src_dt` to `dst_dt`: on some CPUs a conversion has only a
 * reference implementation, slower than candle's. */
int nv_reorder_impl(int src_dt, int dst_dt, char *impl, size_t impl_len) {
    const int64_t dims[4] = {2, 4, 32, 64}, strides[4] = {32 * 8 * 64, 64, 8 * 64, 1};
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_primitive_desc_t pd;
    dnnl_status_t s = reorder_pd(&pd, 4, dims, src_dt, strides, dst_dt, &src_md, &dst_md);
    if (s != dnnl_success) return s;
    impl_name(pd, impl, impl_len);
    dnnl_primitive_desc_destroy(pd);
    return dnnl_success;
}

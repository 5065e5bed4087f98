/*
 * The engine's only C: a thin layer over oneDNN 3.x's matmul, softmax and reorder primitives
 * (built by scripts/onednn.sh), so that the Rust side needs no bindings of the whole C API; the
 * compiler checks every call against the installed header. Callers serialise every call (one
 * engine, one stream, and oneDNN's own OpenMP pool already uses every thread).
 */
#include <oneapi/dnnl/dnnl.h>
#include <omp.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>

/* Element types, as numbered by the Rust side. NV_S8 is for weights only: int8 with an f32
 * scale per output, decompressed inside the matmul into the activations' type. */
enum { NV_F32 = 0, NV_BF16 = 1, NV_F16 = 2, NV_S8 = 3 };
/* Fused after the product and its bias (oneDNN post-ops, computed on the f32 accumulator before
 * the result is rounded to the dtype): an activation, then a product with or a sum with a second
 * (m × n) operand given per call. */
enum { NV_NO_ACTIVATION = 0, NV_SILU = 1, NV_GELU_ERF = 2 };
enum { NV_NO_OPERAND = 0, NV_MUL = 1, NV_ADD = 2 };

static dnnl_engine_t engine;
static dnnl_stream_t stream;

struct nv_matmul {
    /* The activations' type (src, dst and the second operand). */
    dnnl_data_type_t dt;
    int64_t n, k;
    /* The weights, reordered once into the layout oneDNN chose for them, in `weights_buffer`. */
    dnnl_memory_desc_t weights_md;
    dnnl_memory_t weights;
    void *weights_buffer;
    /* f32 bias (1 × n), or NULL. */
    dnnl_memory_t bias;
    /* f32 scale per output (n) of int8 weights, or NULL. */
    dnnl_memory_t scales;
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
    case NV_S8: return dnnl_s8;
    default: return dnnl_data_type_undef;
    }
}

/* A 2-D descriptor; the caller destroys it (dnnl_memory_desc_destroy accepts NULL). */
static dnnl_status_t plain_md(dnnl_memory_desc_t *md, int64_t rows, int64_t cols, dnnl_data_type_t dt,
                              dnnl_format_tag_t tag) {
    dnnl_dims_t dims = {rows, cols};
    *md = NULL;
    return dnnl_memory_desc_create_with_tag(md, 2, dims, dt, tag);
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

/*
 * Attributes of a matmul: post-ops for an activation and a second operand (see the enums above)
 * and, for int8 weights, their scale per output with decompression in the activations' type
 * (bf16, or f32 in strict mode). NULL when there is nothing to set.
 */
static dnnl_status_t matmul_attr(dnnl_primitive_attr_t *attr, dnnl_data_type_t dt, int64_t m, int64_t n,
                                 int int8_weights, int activation, int operand) {
    dnnl_post_ops_t ops = NULL;
    dnnl_memory_desc_t operand_md = NULL;
    dnnl_status_t s;
    *attr = NULL;
    if (!int8_weights && activation == NV_NO_ACTIVATION && operand == NV_NO_OPERAND) return dnnl_success;
    if ((s = dnnl_primitive_attr_create(attr)) != dnnl_success) return s;
    if (int8_weights) {
        /* Mask 1 << 1: one scale per column n of the (k × n) weights. */
        if ((s = dnnl_primitive_attr_set_scales(*attr, DNNL_ARG_WEIGHTS, 1 << 1, 0, NULL, dnnl_f32)) != dnnl_success)
            goto out;
        s = dnnl_primitive_attr_set_fpmath_mode_v2(*attr, dt == dnnl_bf16 ? dnnl_fpmath_mode_bf16
                                                                         : dnnl_fpmath_mode_strict, 1);
        if (s != dnnl_success) goto out;
    }
    if (activation != NV_NO_ACTIVATION || operand != NV_NO_OPERAND) {
        if ((s = dnnl_post_ops_create(&ops)) != dnnl_success) goto out;
        if (activation != NV_NO_ACTIVATION) {
            /* SiLU is oneDNN's swish with alpha 1: x·sigmoid(x). */
            dnnl_alg_kind_t alg = activation == NV_SILU ? dnnl_eltwise_swish : dnnl_eltwise_gelu_erf;
            if ((s = dnnl_post_ops_append_eltwise(ops, alg, 1.0f, 0.0f)) != dnnl_success) goto out;
        }
        if (operand != NV_NO_OPERAND) {
            if ((s = plain_md(&operand_md, m, n, dt, dnnl_ab)) != dnnl_success) goto out;
            s = dnnl_post_ops_append_binary(ops, operand == NV_MUL ? dnnl_binary_mul : dnnl_binary_add, operand_md);
            if (s != dnnl_success) goto out;
        }
        s = dnnl_primitive_attr_set_post_ops(*attr, ops);
    }
out:
    dnnl_memory_desc_destroy(operand_md);
    if (ops) dnnl_post_ops_destroy(ops);
    if (s != dnnl_success && *attr) {
        dnnl_primitive_attr_destroy(*attr);
        *attr = NULL;
    }
    return s;
}

/* A matmul primitive descriptor for (m × k) · weights (+ bias) → (m × n), row-major src and dst
 * of type `dt`; the weights' type is `weights_md`'s. */
static dnnl_status_t matmul_pd(dnnl_primitive_desc_t *pd, dnnl_data_type_t dt, int64_t m, int64_t n, int64_t k,
                               const_dnnl_memory_desc_t weights_md, int has_bias, int activation, int operand) {
    dnnl_memory_desc_t src = NULL, dst = NULL, bias = NULL;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_data_type_t weights_dt = dnnl_data_type_undef;
    dnnl_status_t s;
    if ((s = dnnl_memory_desc_query(weights_md, dnnl_query_data_type, &weights_dt)) != dnnl_success) return s;
    if ((s = plain_md(&src, m, k, dt, dnnl_ab)) != dnnl_success) goto out;
    if ((s = plain_md(&dst, m, n, dt, dnnl_ab)) != dnnl_success) goto out;
    if ((s = plain_md(&bias, 1, n, dnnl_f32, dnnl_ab)) != dnnl_success) goto out;
    if ((s = matmul_attr(&attr, dt, m, n, weights_dt == dnnl_s8, activation, operand)) != dnnl_success) goto out;
    s = dnnl_matmul_primitive_desc_create(pd, engine, src, weights_md, has_bias ? bias : NULL, dst, attr);
out:
    if (attr) dnnl_primitive_attr_destroy(attr);
    dnnl_memory_desc_destroy(src);
    dnnl_memory_desc_destroy(dst);
    dnnl_memory_desc_destroy(bias);
    return s;
}

/* One argument of `run`: a caller-owned buffer `data` described by `md`, or a memory object. */
struct run_arg {
    int name;
    const_dnnl_memory_desc_t md;
    const void *data;
    dnnl_memory_t memory;
};

#define MAX_RUN_ARGS 6
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

/* Runs the matmul `prim` of `mm` on caller-owned buffers; `operand` (m × n) is the binary
 * post-op's, if any, at post-op index `operand_index`. */
static dnnl_status_t execute(dnnl_primitive_t prim, const struct nv_matmul *mm, int64_t m, const void *src,
                             const void *operand, int operand_index, void *dst) {
    dnnl_memory_desc_t src_md = NULL, dst_md = NULL;
    struct run_arg args[MAX_RUN_ARGS];
    int count = 0;
    dnnl_status_t s;
    if ((s = plain_md(&src_md, m, mm->k, mm->dt, dnnl_ab)) != dnnl_success) goto out;
    if ((s = plain_md(&dst_md, m, mm->n, mm->dt, dnnl_ab)) != dnnl_success) goto out;
    args[count++] = (struct run_arg){DNNL_ARG_SRC, src_md, src, NULL};
    args[count++] = (struct run_arg){DNNL_ARG_WEIGHTS, NULL, NULL, mm->weights};
    args[count++] = (struct run_arg){DNNL_ARG_DST, dst_md, dst, NULL};
    if (mm->bias) args[count++] = (struct run_arg){DNNL_ARG_BIAS, NULL, NULL, mm->bias};
    if (mm->scales) args[count++] = (struct run_arg){DNNL_ARG_ATTR_SCALES | DNNL_ARG_WEIGHTS, NULL, NULL, mm->scales};
    /* Same shape and dtype as dst. */
    if (operand)
        args[count++] =
            (struct run_arg){DNNL_ARG_ATTR_MULTIPLE_POST_OP(operand_index) | DNNL_ARG_SRC_1, dst_md, operand, NULL};
    s = run(prim, count, args);
out:
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    return s;
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

/* A memory object of `count` f32 copied from `values` (NULL when `values` is): a (1 × count) row
 * for `ndims` 2 (a bias), a vector for 1 (scales). */
static dnnl_status_t f32_vector(dnnl_memory_t *memory, int ndims, int64_t count, const float *values) {
    dnnl_memory_desc_t md = NULL;
    dnnl_dims_t row = {1, count}, vector = {count};
    void *data;
    dnnl_status_t s;
    *memory = NULL;
    if (!values) return dnnl_success;
    s = ndims == 1 ? dnnl_memory_desc_create_with_tag(&md, 1, vector, dnnl_f32, dnnl_a)
                   : dnnl_memory_desc_create_with_tag(&md, 2, row, dnnl_f32, dnnl_ab);
    if (s != dnnl_success) return s;
    s = dnnl_memory_create(memory, md, engine, DNNL_MEMORY_ALLOCATE);
    dnnl_memory_desc_destroy(md);
    if (s == dnnl_success) s = dnnl_memory_get_data_handle(*memory, &data);
    if (s == dnnl_success) memcpy(data, values, (size_t)count * sizeof(float));
    return s;
}

void nv_matmul_free(struct nv_matmul *mm);

/*
 * Packs `weight` (n rows of k, row-major: a PyTorch Linear's layout, i.e. the k × n operand in
 * "ba" order) of type `weights_dt_id` into the layout oneDNN prefers for a matmul of
 * `reference_m` rows of type `dt_id`, and writes the name of the implementation it picked into
 * `impl` (so the caller can tell a native kernel from an emulated or reference one). That layout
 * serves every other row count too. `scales` (n f32) are int8 weights' scales (NULL otherwise);
 * `bias` (n f32) may be NULL; `activation` and `operand` choose the fused post-ops.
 */
int nv_matmul_create(int dt_id, int weights_dt_id, int64_t n, int64_t k, const void *weight, const float *scales,
                     const float *bias, int activation, int operand, int64_t reference_m, struct nv_matmul **out,
                     char *impl, size_t impl_len) {
    dnnl_data_type_t dt = data_type(dt_id), weights_dt = data_type(weights_dt_id);
    dnnl_memory_desc_t any_md = NULL, plain_weights_md = NULL;
    dnnl_primitive_desc_t pd = NULL, reorder_pd = NULL;
    dnnl_primitive_t reorder = NULL;
    struct nv_matmul *mm = NULL;
    dnnl_status_t s;

    *out = NULL;
    if ((weights_dt == dnnl_s8) != (scales != NULL)) return dnnl_invalid_arguments;
    if ((s = plain_md(&any_md, k, n, weights_dt, dnnl_format_tag_any)) != dnnl_success) goto out;
    if ((s = matmul_pd(&pd, dt, reference_m, n, k, any_md, bias != NULL, activation, operand)) != dnnl_success)
        goto out;
    impl_name(pd, impl, impl_len);

    mm = calloc(1, sizeof *mm);
    if (!mm) { s = dnnl_out_of_memory; goto out; }
    mm->dt = dt;
    mm->n = n;
    mm->k = k;
    mm->cached_m = -1;
    mm->activation = activation;
    mm->operand = operand;
    if ((s = f32_vector(&mm->bias, 2, n, bias)) != dnnl_success) goto out;
    if ((s = f32_vector(&mm->scales, 1, n, scales)) != dnnl_success) goto out;
    if ((s = dnnl_memory_desc_clone(&mm->weights_md, dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0)))
        != dnnl_success)
        goto out;
    if (!(mm->weights_buffer = huge_page_buffer(dnnl_memory_desc_get_size(mm->weights_md)))) {
        s = dnnl_out_of_memory;
        goto out;
    }
    if ((s = dnnl_memory_create(&mm->weights, mm->weights_md, engine, mm->weights_buffer)) != dnnl_success) goto out;
    if ((s = plain_md(&plain_weights_md, k, n, weights_dt, dnnl_ba)) != dnnl_success) goto out;
    if ((s = dnnl_reorder_primitive_desc_create(&reorder_pd, plain_weights_md, engine, mm->weights_md, engine, NULL))
        != dnnl_success)
        goto out;
    if ((s = dnnl_primitive_create(&reorder, reorder_pd)) != dnnl_success) goto out;
    {
        struct run_arg args[2] = {{DNNL_ARG_FROM, plain_weights_md, weight, NULL},
                                  {DNNL_ARG_TO, NULL, NULL, mm->weights}};
        s = run(reorder, 2, args);
    }
out:
    if (reorder) dnnl_primitive_destroy(reorder);
    if (reorder_pd) dnnl_primitive_desc_destroy(reorder_pd);
    if (pd) dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(any_md);
    dnnl_memory_desc_destroy(plain_weights_md);
    if (s == dnnl_success) {
        *out = mm;
    } else {
        nv_matmul_free(mm);
    }
    return s;
}

/* dst (m × n) = post-ops(src (m × k) · packed weights + bias), src, dst and `operand` in the
 * activations' type; `operand` (m × n) is the second operand of the fused product or sum, if the
 * matmul has one. */
int nv_matmul_run(struct nv_matmul *mm, int64_t m, const void *src, const void *operand, void *dst) {
    dnnl_status_t s;
    if ((mm->operand != NV_NO_OPERAND) != (operand != NULL)) return dnnl_invalid_arguments;
    if (mm->cached_m != m) {
        dnnl_primitive_desc_t pd;
        dnnl_primitive_t prim;
        if ((s = matmul_pd(&pd, mm->dt, m, mm->n, mm->k, mm->weights_md, mm->bias != NULL, mm->activation,
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
    /* The binary post-op follows the activation when there is one. */
    return execute(mm->cached, mm, m, src, operand, mm->activation != NV_NO_ACTIVATION, dst);
}

void nv_matmul_free(struct nv_matmul *mm) {
    if (!mm) return;
    if (mm->cached) dnnl_primitive_destroy(mm->cached);
    if (mm->bias) dnnl_memory_destroy(mm->bias);
    if (mm->scales) dnnl_memory_destroy(mm->scales);
    if (mm->weights) dnnl_memory_destroy(mm->weights);
    dnnl_memory_desc_destroy(mm->weights_md);
    free(mm->weights_buffer);
    free(mm);
}

/*
 * f32 dst (m × n) = src (m × k) · weight, with `weight` given per call as n rows of k
 * (the path for weights on CPUs without a native kernel for their type: the caller widens them
 * into a reused buffer). oneDNN's primitive cache makes the repeated creation cheap.
 */
int nv_matmul_plain_f32(int64_t m, int64_t n, int64_t k, const float *src, const float *weight, float *dst) {
    struct nv_matmul mm = {.dt = dnnl_f32, .n = n, .k = k};
    dnnl_primitive_desc_t pd = NULL;
    dnnl_primitive_t prim = NULL;
    dnnl_status_t s;
    if ((s = plain_md(&mm.weights_md, k, n, dnnl_f32, dnnl_ba)) != dnnl_success) goto out;
    if ((s = matmul_pd(&pd, dnnl_f32, m, n, k, mm.weights_md, 0, NV_NO_ACTIVATION, NV_NO_OPERAND)) != dnnl_success)
        goto out;
    if ((s = dnnl_primitive_create(&prim, pd)) != dnnl_success) goto out;
    if ((s = dnnl_memory_create(&mm.weights, mm.weights_md, engine, (void *)weight)) != dnnl_success) goto out;
    s = execute(prim, &mm, m, src, NULL, 0, dst);
out:
    if (mm.weights) dnnl_memory_destroy(mm.weights);
    if (prim) dnnl_primitive_destroy(prim);
    if (pd) dnnl_primitive_desc_destroy(pd);
    dnnl_memory_desc_destroy(mm.weights_md);
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

/* Softmax along `axis` of `src` (described by `md`) into `dst`, which may be `src`. */
static dnnl_status_t softmax(const_dnnl_memory_desc_t md, int axis, const void *src, void *dst) {
    dnnl_primitive_desc_t pd;
    dnnl_status_t s = dnnl_softmax_forward_primitive_desc_create(&pd, engine, dnnl_forward_inference,
                                                                 dnnl_softmax_accurate, md, md, axis, NULL);
    if (s != dnnl_success) return s;
    {
        struct run_arg args[2] = {{DNNL_ARG_SRC, md, src, NULL}, {DNNL_ARG_DST, md, dst, NULL}};
        return run_pd(pd, 2, args);
    }
}

/* Softmax of each row of contiguous (rows × cols) `src` of element type `dt` into `dst` (computed
 * in f32 whatever `dt`, rounded once). */
int nv_softmax(int dt, int64_t rows, int64_t cols, const void *src, void *dst) {
    dnnl_memory_desc_t md;
    dnnl_status_t s = plain_md(&md, rows, cols, data_type(dt), dnnl_ab);
    if (s == dnnl_success) s = softmax(md, 1, src, dst);
    dnnl_memory_desc_destroy(md);
    return s;
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
    enum { Q, KT, V, SCORES, OUT, BIAS, MDS };
    dnnl_memory_desc_t md[MDS] = {NULL};
    const dnnl_dims_t dims[MDS] = {{b, g, m, d}, {kv_b, g, d, n}, {kv_b, g, n, d},
                                   {b, g, m, n}, {b, g, m, d},    {b, 1, 1, n}};
    /* (kv_b, g, n, d) row-major is kᵀ (kv_b, g, d, n) with its last two axes swapped. */
    const dnnl_format_tag_t tags[MDS] = {dnnl_abcd, dnnl_abdc, dnnl_abcd, dnnl_abcd, dnnl_abcd, dnnl_abcd};
    dnnl_primitive_desc_t pd;
    dnnl_primitive_attr_t attr = NULL;
    dnnl_post_ops_t ops = NULL;
    dnnl_status_t s = dnnl_success;
    int i;
    for (i = 0; i < MDS && s == dnnl_success; i++) s = dnnl_memory_desc_create_with_tag(&md[i], 4, dims[i], dnnl_f32, tags[i]);
    if (s != dnnl_success) goto out;
    if ((s = dnnl_primitive_attr_create(&attr)) != dnnl_success) goto out;
    if ((s = dnnl_post_ops_create(&ops)) != dnnl_success) goto out;
    if ((s = dnnl_post_ops_append_eltwise(ops, dnnl_eltwise_linear, scale, 0.0f)) != dnnl_success) goto out;
    if (key_bias && (s = dnnl_post_ops_append_binary(ops, dnnl_binary_add, md[BIAS])) != dnnl_success) goto out;
    if ((s = dnnl_primitive_attr_set_post_ops(attr, ops)) != dnnl_success) goto out;
    if ((s = dnnl_matmul_primitive_desc_create(&pd, engine, md[Q], md[KT], NULL, md[SCORES], attr)) != dnnl_success)
        goto out;
    {
        struct run_arg args[4] = {{DNNL_ARG_SRC, md[Q], q, NULL},
                                  {DNNL_ARG_WEIGHTS, md[KT], k, NULL},
                                  {DNNL_ARG_DST, md[SCORES], scores, NULL},
                                  {DNNL_ARG_ATTR_MULTIPLE_POST_OP(1) | DNNL_ARG_SRC_1, md[BIAS], key_bias, NULL}};
        if ((s = run_pd(pd, key_bias ? 4 : 3, args)) != dnnl_success) goto out;
    }
    if ((s = softmax(md[SCORES], 3, scores, scores)) != dnnl_success) goto out;
    if ((s = dnnl_matmul_primitive_desc_create(&pd, engine, md[SCORES], md[V], NULL, md[OUT], NULL)) != dnnl_success)
        goto out;
    {
        struct run_arg args[3] = {{DNNL_ARG_SRC, md[SCORES], scores, NULL},
                                  {DNNL_ARG_WEIGHTS, md[V], v, NULL},
                                  {DNNL_ARG_DST, md[OUT], out, NULL}};
        s = run_pd(pd, 3, args);
    }
out:
    if (ops) dnnl_post_ops_destroy(ops);
    if (attr) dnnl_primitive_attr_destroy(attr);
    for (i = 0; i < MDS; i++) dnnl_memory_desc_destroy(md[i]);
    return s;
}

/* The reorder of an `ndims` array laid out by `src_strides` into a contiguous one (descriptors in
 * `src_md`, `dst_md`, which the caller destroys). */
static dnnl_status_t reorder_pd(dnnl_primitive_desc_t *pd, int ndims, const int64_t *dims, int src_dt,
                                const int64_t *src_strides, int dst_dt, dnnl_memory_desc_t *src_md,
                                dnnl_memory_desc_t *dst_md) {
    dnnl_dims_t d, strides, dst_strides;
    dnnl_status_t s;
    int i;
    *src_md = *dst_md = NULL;
    if (ndims < 1 || ndims > DNNL_MAX_NDIMS) return dnnl_invalid_arguments;
    for (i = ndims - 1; i >= 0; i--) {
        d[i] = dims[i];
        strides[i] = src_strides[i];
        dst_strides[i] = i == ndims - 1 ? 1 : dst_strides[i + 1] * dims[i + 1];
    }
    if ((s = dnnl_memory_desc_create_with_strides(src_md, ndims, d, data_type(src_dt), strides)) != dnnl_success)
        return s;
    if ((s = dnnl_memory_desc_create_with_strides(dst_md, ndims, d, data_type(dst_dt), dst_strides)) != dnnl_success)
        return s;
    return dnnl_reorder_primitive_desc_create(pd, *src_md, engine, *dst_md, engine, NULL);
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
    if (s == dnnl_success) {
        struct run_arg args[2] = {{DNNL_ARG_FROM, src_md, src, NULL}, {DNNL_ARG_TO, dst_md, dst, NULL}};
        s = run_pd(pd, 2, args);
    }
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    return s;
}

/* Writes into `impl` the implementation oneDNN picks for reordering heads out of a projection's
 * output (a transposed slice) from `src_dt` to `dst_dt`: on some CPUs a conversion has only a
 * reference implementation, slower than candle's. */
int nv_reorder_impl(int src_dt, int dst_dt, char *impl, size_t impl_len) {
    const int64_t dims[4] = {2, 4, 32, 64}, strides[4] = {32 * 8 * 64, 64, 8 * 64, 1};
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_primitive_desc_t pd;
    dnnl_status_t s = reorder_pd(&pd, 4, dims, src_dt, strides, dst_dt, &src_md, &dst_md);
    if (s == dnnl_success) {
        impl_name(pd, impl, impl_len);
        dnnl_primitive_desc_destroy(pd);
    }
    dnnl_memory_desc_destroy(src_md);
    dnnl_memory_desc_destroy(dst_md);
    return s;
}

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

/* Element types, as numbered by the Rust side. */
enum { NV_F32 = 0, NV_BF16 = 1, NV_F16 = 2 };

static dnnl_engine_t engine;
static dnnl_stream_t stream;

struct nv_matmul {
    dnnl_data_type_t dt;
    int64_t n, k;
    /* The weights, reordered once into the layout oneDNN chose for them. */
    dnnl_memory_desc_t weights_md;
    dnnl_memory_t weights;
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

int nv_onednn_init(void) {
    dnnl_status_t s = dnnl_engine_create(&engine, dnnl_cpu, 0);
    if (s != dnnl_success) return s;
    return dnnl_stream_create(&stream, engine, dnnl_stream_default_flags);
}

void nv_onednn_set_threads(int threads) { omp_set_num_threads(threads); }

/* A matmul primitive descriptor for (m × k) · weights → (m × n), row-major src and dst. */
static dnnl_status_t matmul_pd(dnnl_primitive_desc_t *pd, dnnl_data_type_t dt, int64_t m, int64_t n, int64_t k,
                               const dnnl_memory_desc_t *weights_md) {
    dnnl_memory_desc_t src, dst;
    dnnl_matmul_desc_t desc;
    dnnl_status_t s;
    if ((s = plain_md(&src, m, k, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = plain_md(&dst, m, n, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = dnnl_matmul_desc_init(&desc, &src, weights_md, NULL, &dst)) != dnnl_success) return s;
    return dnnl_primitive_desc_create(pd, &desc, NULL, engine, NULL);
}

static dnnl_status_t execute(dnnl_primitive_t prim, dnnl_data_type_t dt, int64_t m, int64_t n, int64_t k,
                             const void *src, dnnl_memory_t weights, void *dst) {
    dnnl_memory_desc_t src_md, dst_md;
    dnnl_memory_t src_mem = NULL, dst_mem = NULL;
    dnnl_status_t s;
    if ((s = plain_md(&src_md, m, k, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = plain_md(&dst_md, m, n, dt, dnnl_ab)) != dnnl_success) return s;
    if ((s = dnnl_memory_create(&src_mem, &src_md, engine, (void *)src)) != dnnl_success) goto out;
    if ((s = dnnl_memory_create(&dst_mem, &dst_md, engine, dst)) != dnnl_success) goto out;
    {
        dnnl_exec_arg_t args[3] = {{DNNL_ARG_SRC, src_mem}, {DNNL_ARG_WEIGHTS, weights}, {DNNL_ARG_DST, dst_mem}};
        if ((s = dnnl_primitive_execute(prim, stream, 3, args)) != dnnl_success) goto out;
    }
    s = dnnl_stream_wait(stream);
out:
    if (src_mem) dnnl_memory_destroy(src_mem);
    if (dst_mem) dnnl_memory_destroy(dst_mem);
    return s;
}

/*
 * Packs `weight` (n rows of k, row-major: a PyTorch Linear's layout, i.e. the k × n operand in
 * "ba" order) into the layout oneDNN prefers for a matmul of `reference_m` rows, and writes the
 * name of the implementation it picked into `impl` (so the caller can tell a native kernel from
 * an emulated or reference one). That layout serves every other row count too.
 */
int nv_matmul_create(int dt_id, int64_t n, int64_t k, const void *weight, int64_t reference_m,
                     struct nv_matmul **out, char *impl, size_t impl_len) {
    dnnl_data_type_t dt = data_type(dt_id);
    dnnl_memory_desc_t any_md, plain_weights_md;
    dnnl_primitive_desc_t pd = NULL, reorder_pd = NULL;
    dnnl_primitive_t reorder = NULL;
    dnnl_memory_t plain = NULL;
    struct nv_matmul *mm = NULL;
    const char *name = "";
    dnnl_status_t s;

    *out = NULL;
    if ((s = plain_md(&any_md, k, n, dt, dnnl_format_tag_any)) != dnnl_success) return s;
    if ((s = matmul_pd(&pd, dt, reference_m, n, k, &any_md)) != dnnl_success) return s;
    dnnl_primitive_desc_query(pd, dnnl_query_impl_info_str, 0, &name);
    strncpy(impl, name, impl_len - 1);
    impl[impl_len - 1] = '\0';

    mm = calloc(1, sizeof *mm);
    if (!mm) { s = dnnl_out_of_memory; goto out; }
    mm->dt = dt;
    mm->n = n;
    mm->k = k;
    mm->cached_m = -1;
    mm->weights_md = *dnnl_primitive_desc_query_md(pd, dnnl_query_weights_md, 0);
    if ((s = dnnl_memory_create(&mm->weights, &mm->weights_md, engine, DNNL_MEMORY_ALLOCATE)) != dnnl_success) goto out;
    if ((s = plain_md(&plain_weights_md, k, n, dt, dnnl_ba)) != dnnl_success) goto out;
    if ((s = dnnl_memory_create(&plain, &plain_weights_md, engine, (void *)weight)) != dnnl_success) goto out;
    if ((s = dnnl_reorder_primitive_desc_create(&reorder_pd, &plain_weights_md, engine, &mm->weights_md, engine, NULL))
        != dnnl_success)
        goto out;
    if ((s = dnnl_primitive_create(&reorder, reorder_pd)) != dnnl_success) goto out;
    {
        dnnl_exec_arg_t args[2] = {{DNNL_ARG_FROM, plain}, {DNNL_ARG_TO, mm->weights}};
        if ((s = dnnl_primitive_execute(reorder, stream, 2, args)) != dnnl_success) goto out;
    }
    s = dnnl_stream_wait(stream);
out:
    if (reorder) dnnl_primitive_destroy(reorder);
    if (reorder_pd) dnnl_primitive_desc_destroy(reorder_pd);
    if (plain) dnnl_memory_destroy(plain);
    if (pd) dnnl_primitive_desc_destroy(pd);
    if (s == dnnl_success) {
        *out = mm;
    } else if (mm) {
        if (mm->weights) dnnl_memory_destroy(mm->weights);
        free(mm);
    }
    return s;
}

/* dst (m × n) = src (m × k) · packed weights, all in the matmul's element type. */
int nv_matmul_run(struct nv_matmul *mm, int64_t m, const void *src, void *dst) {
    dnnl_status_t s;
    if (mm->cached_m != m) {
        dnnl_primitive_desc_t pd;
        dnnl_primitive_t prim;
        if ((s = matmul_pd(&pd, mm->dt, m, mm->n, mm->k, &mm->weights_md)) != dnnl_success) return s;
        s = dnnl_primitive_create(&prim, pd);
        dnnl_primitive_desc_destroy(pd);
        if (s != dnnl_success) return s;
        if (mm->cached) dnnl_primitive_destroy(mm->cached);
        mm->cached = prim;
        mm->cached_m = m;
    }
    return execute(mm->cached, mm->dt, m, mm->n, mm->k, src, mm->weights, dst);
}

void nv_matmul_free(struct nv_matmul *mm) {
    if (!mm) return;
    if (mm->cached) dnnl_primitive_destroy(mm->cached);
    dnnl_memory_destroy(mm->weights);
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
    if ((s = matmul_pd(&pd, dnnl_f32, m, n, k, &weights_md)) != dnnl_success) return s;
    s = dnnl_primitive_create(&prim, pd);
    dnnl_primitive_desc_destroy(pd);
    if (s != dnnl_success) return s;
    if ((s = dnnl_memory_create(&weights, &weights_md, engine, (void *)weight)) == dnnl_success) {
        s = execute(prim, dnnl_f32, m, n, k, src, weights, dst);
        dnnl_memory_destroy(weights);
    }
    dnnl_primitive_destroy(prim);
    return s;
}

//! oneDNN as on an AVX2-only CPU (no bf16 matmul at all in oneDNN 2.6).

mod common;

#[test]
fn avx2_cpus_run_f32_natively_and_16_bit_widened() {
    common::check_under_isa_cap("AVX2", "avx512");
}

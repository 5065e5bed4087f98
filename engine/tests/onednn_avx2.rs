//! oneDNN as on an AVX2-only CPU (no native bf16 matmul; int8 weights decompressed into f32).

mod common;

#[test]
fn avx2_cpus_run_f32_natively_and_16_bit_widened() {
    common::check_under_isa_cap("AVX2", "avx512");
}

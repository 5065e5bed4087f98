//! oneDNN as on an AVX-512 CPU without BF16 (Skylake / Cascade Lake Xeons), where its bf16
//! matmul is emulated at about half its f32 rate.

mod common;

#[test]
fn avx512_cpus_without_bf16_run_16_bit_widened() {
    common::check_under_isa_cap("AVX512_CORE", "bf16");
}

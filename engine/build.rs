//! Builds the C layer over oneDNN (`csrc/onednn_matmul.c`) when the `onednn` feature is on.
//! oneDNN itself is Debian's `libdnnl-dev`, linked dynamically.

fn main() {
    println!("cargo:rerun-if-changed=csrc/onednn_matmul.c");
    #[cfg(feature = "onednn")]
    {
        cc::Build::new().file("csrc/onednn_matmul.c").warnings(true).compile("nvembed_onednn");
        println!("cargo:rustc-link-lib=dylib=dnnl");
        // oneDNN's Debian build threads with OpenMP; the thread count is set through libgomp.
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
}

//! Builds the C layer over oneDNN (`csrc/onednn_matmul.c`) when the `onednn` feature is on.
//! oneDNN itself is the static build `scripts/onednn.sh` installs (`make setup` runs it) under
//! `NVEMBED_ONEDNN_PREFIX`, by default `/opt/nvembed-onednn`.

fn main() {
    println!("cargo:rerun-if-changed=csrc/onednn_matmul.c");
    #[cfg(feature = "onednn")]
    {
        use std::path::PathBuf;
        const PREFIX_ENV: &str = "NVEMBED_ONEDNN_PREFIX";
        println!("cargo:rerun-if-env-changed={PREFIX_ENV}");
        let prefix = PathBuf::from(std::env::var(PREFIX_ENV).unwrap_or_else(|_| "/opt/nvembed-onednn".into()));
        let library = prefix.join("lib/libdnnl.a");
        if !library.is_file() {
            panic!(
                "oneDNN is not built: {} is missing. Run `make setup` (scripts/onednn.sh {}), or build \
                 without the `onednn` feature (candle's matmul).",
                library.display(),
                prefix.display()
            );
        }
        // The recipe stamp changes whenever scripts/onednn.sh rebuilds oneDNN (a prefix made by
        // hand has none, and a missing file would rerun this script on every build).
        let stamp = prefix.join("nvembed-recipe");
        let watched = if stamp.is_file() { stamp } else { library.clone() };
        println!("cargo:rerun-if-changed={}", watched.display());
        cc::Build::new()
            .file("csrc/onednn_matmul.c")
            .include(prefix.join("include"))
            .warnings(true)
            .compile("nvembed_onednn");
        println!("cargo:rustc-link-search=native={}", prefix.join("lib").display());
        println!("cargo:rustc-link-lib=static=dnnl");
        // oneDNN is C++ and threads with OpenMP (libgomp, whose thread count the engine sets).
        println!("cargo:rustc-link-lib=dylib=stdc++");
        println!("cargo:rustc-link-lib=dylib=gomp");
    }
}

//! Builds the oneDNN binding (src/dnnl/shim.cpp) where oneDNN's headers are installed
//! (Debian: `apt-get install libdnnl-dev`) and sets `cfg(dnnl)`; without them locograph builds
//! as before and its convolutions run on its own im2col kernels (derived.json says which ran).
//! `LOCOGRAPH_NO_DNNL=1` builds without oneDNN even where it is installed.

use std::path::PathBuf;

fn main() {
    println!("cargo:rustc-check-cfg=cfg(dnnl)");
    println!("cargo:rerun-if-changed=src/dnnl/shim.cpp");
    println!("cargo:rerun-if-env-changed=LOCOGRAPH_NO_DNNL");
    println!("cargo:rerun-if-env-changed=DNNL_ROOT");
    if std::env::var_os("LOCOGRAPH_NO_DNNL").is_some_and(|v| v != "0") {
        println!("cargo:warning=LOCOGRAPH_NO_DNNL set: building without oneDNN");
        return;
    }
    let root = std::env::var_os("DNNL_ROOT").map(PathBuf::from).unwrap_or_else(|| PathBuf::from("/usr"));
    let include = root.join("include");
    if !include.join("dnnl.hpp").exists() {
        println!(
            "cargo:warning=oneDNN not found ({}): convolutions use locograph's im2col kernels; \
             `apt-get install libdnnl-dev` (or DNNL_ROOT) for the oneDNN ones",
            include.join("dnnl.hpp").display()
        );
        return;
    }
    cc::Build::new()
        .cpp(true)
        .std("c++17")
        .include(&include)
        .flag("-fopenmp")
        .opt_level(2)
        .warnings(false)
        .file("src/dnnl/shim.cpp")
        .compile("locograph_dnnl");
    if root != std::path::Path::new("/usr") {
        println!("cargo:rustc-link-search=native={}", root.join("lib").display());
    }
    println!("cargo:rustc-link-lib=dylib=dnnl");
    println!("cargo:rustc-link-lib=dylib=gomp");
    println!("cargo:rustc-cfg=dnnl");
}

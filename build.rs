//! Compiles Cortex's CUDA kernels (`src/cuda/kernels.cu`) to PTX when the `cuda` feature is
//! on; the default CPU build does nothing here. nvcc is `$CORTEX_NVCC`, else `nvcc` on
//! PATH (`scripts/cuda_env.sh` provides one from PyPI). The PTX targets compute_80, so one
//! build runs on every GPU from Ampere on (the driver compiles it for the GPU at load), and
//! a second copy compute_90, whose kernels Hopper and later launch programmatically.

use std::env;
use std::path::PathBuf;
use std::process::Command;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    if env::var_os("CARGO_FEATURE_CUDA").is_none() {
        return;
    }
    let source = "src/cuda/kernels.cu";
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=CORTEX_NVCC");
    let out = PathBuf::from(env::var_os("OUT_DIR").expect("cargo sets OUT_DIR"));
    let nvcc = env::var("CORTEX_NVCC").unwrap_or_else(|_| "nvcc".into());
    // Once for every GPU from Ampere on, once for Hopper on (programmatic dependent launch),
    // side by side.
    let builds = [
        ("compute_80", "kernels.ptx"),
        ("compute_90", "kernels_sm90.ptx"),
    ]
    .map(|(arch, file)| {
        Command::new(&nvcc)
            .args([
                "--ptx",
                "-O3",
                "-std=c++17",
                &format!("-arch={arch}"),
                "-lineinfo",
                "-o",
            ])
            .arg(out.join(file))
            .arg(source)
            .spawn()
            .unwrap_or_else(|e| {
                panic!("running {nvcc} (set CORTEX_NVCC, or use scripts/cuda_env.sh): {e}")
            })
    });
    for mut build in builds {
        let status = build.wait().expect("nvcc runs");
        assert!(status.success(), "{nvcc} failed on {source}");
    }
}

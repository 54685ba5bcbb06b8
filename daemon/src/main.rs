//! hearthd: the on-device AI system service (the library's `hearthd_main`).

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    hearthd::hearthd_main()
}

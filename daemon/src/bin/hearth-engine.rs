//! hearth-engine: one loaded model's engine, in a sandboxed process of its own. hearthd
//! starts it with one end of a socket pair as stdin; it is not meant to be run by hand.

#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    hearthd::engine::child::main()
}

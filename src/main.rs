#![deny(unsafe_code)]

fn main() {
    std::process::exit(strata::cmd::main());
}

fn main() {
    std::process::exit(strata::cmd::main());
}

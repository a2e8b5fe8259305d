//! `selvedge-cni`: the chained CNI plugin (see `selvedge::cni`).

fn main() -> std::process::ExitCode {
    selvedge::cni::plugin::main()
}

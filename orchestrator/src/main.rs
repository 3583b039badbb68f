fn main() -> std::process::ExitCode {
    switchyard_orchestrator::cli::main()
}

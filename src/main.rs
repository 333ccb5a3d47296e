//! imgsafe command-line entry point: parse, run, map the error to an exit code.

fn main() {
    // Inside the appliance this same binary is /init, the guest agent.
    if imgsafe_agent::is_appliance_init() {
        imgsafe_agent::run();
    }
    std::process::exit(imgsafe::main_with_args(std::env::args_os()));
}

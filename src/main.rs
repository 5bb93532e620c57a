use std::collections::HashMap;
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"))
        .format_timestamp_millis()
        .init();
    let env: HashMap<String, String> = std::env::vars().collect();
    let settings = match nixery::config::Settings::load(&env) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("nixery: {e}");
            return ExitCode::from(2);
        }
    };
    match actix_web::rt::System::new().block_on(nixery::app::run(settings)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixery: {e}");
            ExitCode::FAILURE
        }
    }
}

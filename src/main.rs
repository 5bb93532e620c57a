use std::collections::HashMap;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut logger =
        env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("info"));
    logger.format_timestamp_millis();
    nixery::logsink::init(logger);
    let env: HashMap<String, String> = std::env::vars().collect();
    let result = nixery::config::Settings::load(&env)
        .map(|settings| actix_web::rt::System::new().block_on(nixery::app::run(settings)));
    nixery::logsink::finish();
    match result {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("nixery: {e}");
            ExitCode::from(2)
        }
        Ok(Err(e)) => {
            eprintln!("nixery: {e}");
            ExitCode::FAILURE
        }
    }
}

use std::collections::HashMap;
use std::process::ExitCode;

fn main() -> ExitCode {
    nixery::logsink::init();
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

//! Writes the ClipImage CRD: to the file named by the first argument, or to stdout.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let file = clip_api::crd_file()?;
    match std::env::args().nth(1) {
        Some(path) => std::fs::write(path, file)?,
        None => print!("{file}"),
    }
    Ok(())
}

//! `sqlx::migrate!` embeds `migrations/` when the api is compiled, but Cargo does not know the
//! directory is an input: a change that only adds a migration would build an api without it.
//! This tells Cargo to rebuild the api whenever anything under `migrations/` changes.
fn main() {
    println!("cargo:rerun-if-changed=../migrations");
}

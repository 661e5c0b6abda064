// `sqlx::migrate!` embeds migrations/*.sql with include_str!, which makes cargo watch the files it
// found but not the directory: a new migration would not rebuild the crate without this.
fn main() {
    println!("cargo:rerun-if-changed=migrations");
}

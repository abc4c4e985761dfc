//! The README's API tour is `examples/api_tour.rs`, which is compiled with
//! the other examples: this test fails when the two drift apart.

#[test]
fn the_readme_api_tour_is_the_compiled_example() {
    let root = concat!(env!("CARGO_MANIFEST_DIR"), "/..");
    let readme = std::fs::read_to_string(format!("{root}/README.md")).expect("README.md");
    let example = std::fs::read_to_string(format!("{root}/examples/examples/api_tour.rs"))
        .expect("api_tour.rs");
    let tour = readme
        .split("\n## API tour\n")
        .nth(1)
        .expect("an `## API tour` section");
    let block = tour
        .split("```rust\n")
        .nth(1)
        .and_then(|rest| rest.split("\n```").next())
        .expect("a ```rust block in the API tour");
    assert_eq!(
        block.trim_end(),
        example.trim_end(),
        "README.md's API tour must be examples/examples/api_tour.rs verbatim"
    );
}

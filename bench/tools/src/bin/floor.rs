//! The floor proxy on the system allocator: `floor LISTEN UPSTREAM`.

fn main() {
    vigil_bench::floor_main();
}

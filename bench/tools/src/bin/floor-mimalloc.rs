//! The floor proxy on mimalloc, vigil's allocator: `floor-mimalloc LISTEN UPSTREAM`.

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() {
    vigil_bench::floor_main();
}

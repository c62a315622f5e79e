//! Augmentation throughput: SimCLR's default pipeline through the real `PairLoader`, at 32×32
//! and 224×224, with 1 and 2 worker threads. `cargo bench --bench augment`.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    println!("{:>5} {:>8} {:>8} {:>12}", "side", "threads", "views", "views/s");
    for (side, images) in [(32, 4096), (224, 256)] {
        for threads in [1, 2] {
            let r = locograph::data::bench::bench_augment(side, threads, images)?;
            println!("{:>5} {:>8} {:>8} {:>12.0}", r.side, r.threads, r.views, r.views_per_second());
        }
    }
    Ok(())
}

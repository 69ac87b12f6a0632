#[test]
fn show() {
    let m = rlsgate::metrics::Metrics::new(true, 1);
    m.transaction_finished("north", std::time::Duration::from_millis(2));
    m.transaction_finished("south", std::time::Duration::from_millis(2));
    print!("{}", m.encode());
}

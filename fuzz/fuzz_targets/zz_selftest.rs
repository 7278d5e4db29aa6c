#![no_main]
libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    if data.len() > 3 && data[0] == b'M' { panic!("selftest crash"); }
});

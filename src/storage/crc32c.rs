//! CRC-32C (Castagnoli), the checksum GCS keeps for every object. Comparing it with
//! our own over the bytes we sent catches corruption between the packer and the
//! bucket before an object is published under a digest it would not match.

/// Extends `crc` (0 for an empty input) over `data`, with the CPU's CRC32
/// instructions where it has them (the `crc32c` crate), so the checksum costs
/// nothing next to the gzip that produces the bytes.
pub fn update(crc: u32, data: &[u8]) -> u32 {
    ::crc32c::crc32c_append(crc, data)
}

/// The form GCS reports it in: base64 of the big-endian value.
pub fn to_base64(crc: u32) -> String {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD.encode(crc.to_be_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn known_values() {
        // RFC 3720 (iSCSI), appendix B.4, and the usual check value.
        assert_eq!(update(0, b"123456789"), 0xE306_9283);
        assert_eq!(update(0, &[0u8; 32]), 0x8A91_36AA);
        assert_eq!(update(0, &[0xffu8; 32]), 0x62A8_AB43);
        let ascending: Vec<u8> = (0..32).collect();
        assert_eq!(update(0, &ascending), 0x46DD_794E);
        assert_eq!(update(0, b""), 0);
    }

    #[test]
    fn incremental_equals_whole() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + i / 13) as u8).collect();
        let whole = update(0, &data);
        for split in [0, 1, 7, 8, 9, 4095, 9_999, 10_000] {
            let (a, b) = data.split_at(split);
            assert_eq!(update(update(0, a), b), whole, "split at {split}");
        }
    }

    #[test]
    fn base64_is_of_the_big_endian_bytes() {
        assert_eq!(to_base64(0xE306_9283), "4waSgw==");
    }
}

//! CRC-32C (Castagnoli), the checksum GCS keeps for every object. Comparing it with
//! our own over the bytes we sent catches corruption between the packer and the
//! bucket before an object is published under a digest it would not match.

const POLY: u32 = 0x82F6_3B78;

/// Slice-by-8 tables: eight bytes per step keeps the checksum far below the cost of
/// the gzip that produces the bytes.
const TABLES: [[u32; 256]; 8] = tables();

const fn tables() -> [[u32; 256]; 8] {
    let mut t = [[0u32; 256]; 8];
    let mut i = 0;
    while i < 256 {
        let mut c = i as u32;
        let mut k = 0;
        while k < 8 {
            c = if c & 1 != 0 { (c >> 1) ^ POLY } else { c >> 1 };
            k += 1;
        }
        t[0][i] = c;
        i += 1;
    }
    let mut s = 1;
    while s < 8 {
        let mut i = 0;
        while i < 256 {
            let prev = t[s - 1][i];
            t[s][i] = (prev >> 8) ^ t[0][(prev & 0xff) as usize];
            i += 1;
        }
        s += 1;
    }
    t
}

/// Extends `crc` (0 for an empty input) over `data`.
pub fn update(crc: u32, data: &[u8]) -> u32 {
    let mut c = !crc;
    let mut chunks = data.chunks_exact(8);
    for b in &mut chunks {
        let lo = c ^ u32::from_le_bytes([b[0], b[1], b[2], b[3]]);
        c = TABLES[7][(lo & 0xff) as usize]
            ^ TABLES[6][((lo >> 8) & 0xff) as usize]
            ^ TABLES[5][((lo >> 16) & 0xff) as usize]
            ^ TABLES[4][(lo >> 24) as usize]
            ^ TABLES[3][b[4] as usize]
            ^ TABLES[2][b[5] as usize]
            ^ TABLES[1][b[6] as usize]
            ^ TABLES[0][b[7] as usize];
    }
    for &b in chunks.remainder() {
        c = (c >> 8) ^ TABLES[0][((c ^ b as u32) & 0xff) as usize];
    }
    !c
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

//! Language-model evaluation windows over plain text (RUNTIME.md §5.3, last paragraph): the
//! convention of the fixtures' `valid_loss` — documents (separated by blank lines) tokenized
//! each with the tokenizer's special tokens (`</s>` first for OPT), joined in file order, cut
//! into fixed windows; every position of a window is a target except its last. Line endings
//! are normalised to `\n` first (`\r\n` and lone `\r`), as Python's text mode does when the
//! fixtures' recipe reads the corpus: some documents of `corpus/valid.txt` have CRLF endings, and
//! without this their `\r` become extra tokens (0.06 nats of the fixtures' valid loss).

use super::{Example, Result, Shape, Tokenizer};

/// The full `window`-token windows of `text` (a trailing partial window is dropped).
pub fn text_windows(tokenizer: &Tokenizer, text: &str, window: usize) -> Result<Vec<Example>> {
    let text = text.replace("\r\n", "\n").replace('\r', "\n");
    let mut ids = Vec::new();
    for doc in text.split("\n\n") {
        ids.extend(tokenizer.encode(doc, true)?);
    }
    Ok(ids
        .chunks_exact(window.max(1))
        .enumerate()
        .map(|(i, w)| Example {
            ids: w.to_vec(),
            loss_mask: vec![true; w.len()],
            line: 0,
            shape: Shape::Text,
            group: i as u64,
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn windows_are_full_and_line_endings_normalised() {
        let path = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../assets/default/opt-tiny/tokenizer.json"
        );
        let tok = Tokenizer::from_file(path).unwrap();
        let unix = "Hello world.\nA second line.\n\nAnother document here.";
        let dos = unix.replace('\n', "\r\n");
        let a = text_windows(&tok, unix, 4).unwrap();
        assert_eq!(a, text_windows(&tok, &dos, 4).unwrap());
        let ids: Vec<u32> = [
            tok.encode("Hello world.\nA second line.", true).unwrap(),
            tok.encode("Another document here.", true).unwrap(),
        ]
        .concat();
        assert_eq!(a.len(), ids.len() / 4);
        assert!(a
            .iter()
            .all(|w| w.ids.len() == 4 && w.loss_mask.iter().all(|&m| m)));
        assert_eq!(
            a.iter().flat_map(|w| w.ids.clone()).collect::<Vec<_>>(),
            ids[..a.len() * 4]
        );
        assert_eq!(a[0].ids[0], 2, "each document starts with </s>");
    }
}

//! Cutting a long text into chunks that each fit the model's input, by the model's own
//! tokenizer: a token budget per chunk, an overlap between neighbours, and cuts where the text
//! has them (a paragraph break first, then a line break, a sentence end, a space; mid-word only
//! where a stretch of text has none of these).
//!
//! A chunk is a span of the text (byte offsets), trimmed of surrounding whitespace, so what is
//! stored is the text itself and a chunk can be found again in its document. The budget counts
//! what the model sees: `instruction + chunk + "</s>"` with `<s>` prepended, exactly as
//! `InputEncoder::encode_one` builds it; each chunk is checked that way, so none is truncated
//! when embedded with the same instruction and `max_tokens` as its `max_length`.
//!
//! The tokenizer reads one window at a time, from the chunk's start over a little more than a
//! chunk and its overlap (grown where the text's tokens are longer than usual): its memory and
//! time follow the budget, not the document (a tokenizer holds tens of bytes per byte of text),
//! and the text is tokenized about twice in all, once in windows and once chunk by chunk.

use std::ops::Range;

use crate::encoding::InputEncoder;
use crate::error::{Error, Result};

/// `<s>` and `</s>`, around every input.
const SPECIAL_TOKENS: usize = 2;
/// Fewest tokens of text a chunk may hold: any character fits (byte fallback spells one in at
/// most four tokens and a `▁`), and a text has at most one chunk per this many of its tokens.
pub const MIN_CHUNK_TEXT_TOKENS: usize = 16;
/// Tokens a window reaches past the chunk it is read for: those near a window's end may be
/// merged differently from the whole text's, and are never used.
const WINDOW_SLACK_TOKENS: usize = 16;
/// A window's first size, per token: English takes ~4 bytes a token; longer ones grow it.
const WINDOW_BYTES_PER_TOKEN: usize = 8;

/// Where a chunk may end, worst to best.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Cut {
    InsideWord,
    Word,
    Sentence,
    Line,
    Paragraph,
}

/// Characters that end a sentence, and those that may follow the end (closing quotes, brackets).
const SENTENCE_ENDS: &[char] = &['.', '!', '?', '…', '。', '！', '？'];
const CLOSERS: &[char] = &['"', '\'', ')', ']', '}', '”', '’', '»', '」', '』'];
/// Scripts written without spaces end sentences with these and no space after them.
const SPACELESS_SENTENCE_ENDS: &[char] = &['。', '！', '？'];

/// Tokens of text one chunk may hold for `instruction` and `max_tokens` (the model input's
/// length, `<s>` and `</s>` included): an error when the instruction leaves less than
/// `MIN_CHUNK_TEXT_TOKENS`.
pub fn chunk_text_budget(encoder: &InputEncoder, instruction: &str, max_tokens: usize) -> Result<usize> {
    let prefix = encoder.instruction_len(instruction)?;
    match max_tokens.checked_sub(prefix + SPECIAL_TOKENS) {
        Some(budget) if budget >= MIN_CHUNK_TEXT_TOKENS => Ok(budget),
        _ => Err(Error::InvalidArgument(format!(
            "a chunk of at most {max_tokens} tokens has no room for text: the instruction takes {prefix} tokens, \
             <s> and </s> take {SPECIAL_TOKENS}, and a chunk holds at least {MIN_CHUNK_TEXT_TOKENS} tokens of text"
        ))),
    }
}

/// The chunks of `text`, as byte ranges in order, each fitting `max_tokens` with
/// `instruction`; consecutive chunks share about `overlap` tokens (fewer where a better place
/// to start is near), at most half of a chunk's text so that each chunk moves on by as much.
/// An empty or blank text has no chunks. `gave_up` is asked before each chunk.
pub fn chunk_spans(
    encoder: &InputEncoder,
    instruction: &str,
    text: &str,
    max_tokens: usize,
    overlap: usize,
    gave_up: &dyn Fn() -> bool,
) -> Result<Vec<Range<usize>>> {
    let budget = chunk_text_budget(encoder, instruction, max_tokens)?;
    if overlap > budget / 2 {
        return Err(Error::InvalidArgument(format!(
            "an overlap of {overlap} tokens is more than half of the {budget} tokens of text a chunk of {max_tokens} tokens holds"
        )));
    }
    let prefix = encoder.instruction_len(instruction)?;
    let mut spans = Vec::new();
    let mut start = skip_whitespace(text, 0);
    while start < text.len() {
        if gave_up() {
            return Err(Error::Cancelled);
        }
        let mut limit = budget;
        let step = loop {
            let step = next_chunk(encoder, text, start, limit, overlap)?;
            let tokens = encoder.encode_one(instruction, prefix, &text[step.span.clone()], usize::MAX)?.ids.len();
            if tokens <= max_tokens {
                break step;
            }
            // Cut alone, a text may tokenize a little longer than inside the whole (its first
            // word gains the leading `▁`, merges across its ends are lost): take off the excess.
            if limit == 1 {
                return Err(Error::InvalidArgument(format!(
                    "the text at byte {start} cannot be cut into a chunk of at most {max_tokens} tokens"
                )));
            }
            limit = limit.saturating_sub(tokens - max_tokens).max(1);
        };
        spans.push(step.span);
        start = step.next_start;
    }
    Ok(spans)
}

struct Step {
    span: Range<usize>,
    next_start: usize,
}

/// The chunk starting at `start` (not whitespace) with at most `limit` tokens of text, and
/// where the next one starts.
fn next_chunk(encoder: &InputEncoder, text: &str, start: usize, limit: usize, overlap: usize) -> Result<Step> {
    let mut window_bytes = (limit + overlap + WINDOW_SLACK_TOKENS).saturating_mul(WINDOW_BYTES_PER_TOKEN);
    loop {
        let end = floor_char_boundary(text, start.saturating_add(window_bytes).min(text.len()));
        let encoding = encoder
            .tokenizer()
            .encode(&text[start..end], false)
            .map_err(|e| Error::Encode(e.to_string()))?;
        // Token starts, as offsets in `text`; pieces of one character (byte fallback) share one.
        let starts: Vec<usize> = encoding.get_offsets().iter().map(|&(s, _)| start + s).collect();
        if starts.len() <= limit && end == text.len() {
            return Ok(Step {
                span: start..trim_end(text, start, end),
                next_start: end,
            });
        }
        if starts.len() <= limit + WINDOW_SLACK_TOKENS && end < text.len() {
            // Longer tokens than the window was sized for: read further.
            window_bytes = window_bytes.saturating_mul(2);
            continue;
        }
        // Token j starts a possible cut; the chunk holds tokens 0..j. The latest of the best
        // kind in the second half of the budget, so chunks are not cut short for a weak reason.
        let cut_at = |j: usize| (starts[j] > starts[j - 1]).then(|| cut_kind(text, start, starts[j]));
        let lowest = (limit / 2).max(1);
        let (kind, j) = (lowest..=limit)
            .filter_map(|j| cut_at(j).map(|kind| (kind, j)))
            .max()
            // Every token of the second half lies inside one character: the first boundary after it.
            .or_else(|| (limit + 1..starts.len()).find_map(|j| cut_at(j).map(|kind| (kind, j))))
            .unwrap_or((Cut::InsideWord, starts.len()));
        let cut = starts.get(j).copied().unwrap_or(end);
        let span = start..trim_end(text, start, cut);
        // The next chunk starts `overlap` tokens back at most, at the best kind of place there,
        // as far back as that kind allows (inside the chunk: not in the whitespace it ends at).
        let next_start = if overlap == 0 || (kind == Cut::InsideWord && j >= starts.len()) {
            cut
        } else {
            let earliest = j.saturating_sub(overlap).max(1);
            (earliest..j)
                .filter(|&i| starts[i] < span.end)
                .filter_map(|i| cut_at(i).map(|kind| (kind, std::cmp::Reverse(i))))
                .max()
                .map_or(cut, |(_, std::cmp::Reverse(i))| starts[i])
        };
        return Ok(Step {
            span,
            next_start: skip_whitespace(text, next_start),
        });
    }
}

/// What kind of cut a chunk ending just before byte `at` (a character boundary after `floor`)
/// would make: judged by the whitespace around `at` and what precedes it.
fn cut_kind(text: &str, floor: usize, at: usize) -> Cut {
    let before = text[..at].trim_end_matches(char::is_whitespace);
    let gap_start = before.len().max(floor);
    let gap_end = at + (text[at..].len() - text[at..].trim_start_matches(char::is_whitespace).len());
    let gap = &text[gap_start..gap_end];
    let newlines = gap.matches('\n').count();
    let last = before.trim_end_matches(CLOSERS).chars().next_back();
    if newlines >= 2 {
        Cut::Paragraph
    } else if newlines == 1 {
        Cut::Line
    } else if !gap.is_empty() && last.is_some_and(|c| SENTENCE_ENDS.contains(&c)) {
        Cut::Sentence
    } else if gap.is_empty() && last.is_some_and(|c| SPACELESS_SENTENCE_ENDS.contains(&c)) {
        Cut::Sentence
    } else if !gap.is_empty() {
        Cut::Word
    } else {
        Cut::InsideWord
    }
}

fn skip_whitespace(text: &str, from: usize) -> usize {
    text.len() - text[from..].trim_start_matches(char::is_whitespace).len()
}

/// `end`, moved back over whitespace, but not before `start`.
fn trim_end(text: &str, start: usize, end: usize) -> usize {
    start + text[start..end].trim_end_matches(char::is_whitespace).len()
}

fn floor_char_boundary(text: &str, mut at: usize) -> usize {
    while !text.is_char_boundary(at) {
        at -= 1;
    }
    at
}

#[cfg(test)]
mod tests {
    use std::path::Path;

    use super::*;
    use crate::encoding::QUERY_INSTRUCTION;

    fn encoder() -> InputEncoder {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/nvembed-tiny-a/tokenizer.json");
        InputEncoder::from_file(&path).unwrap()
    }

    fn never() -> bool {
        false
    }

    fn tokens(encoder: &InputEncoder, instruction: &str, text: &str) -> usize {
        let prefix = encoder.instruction_len(instruction).unwrap();
        encoder.encode_one(instruction, prefix, text, usize::MAX).unwrap().ids.len()
    }

    /// Every chunk fits, is trimmed and non-empty; chunks are in order, overlap or touch, and
    /// together cover every non-blank character.
    fn check_spans(encoder: &InputEncoder, instruction: &str, text: &str, max_tokens: usize, spans: &[Range<usize>]) {
        for span in spans {
            let chunk = &text[span.clone()];
            assert!(!chunk.is_empty() && chunk.trim() == chunk, "{chunk:?}");
            let n = tokens(encoder, instruction, chunk);
            assert!(n <= max_tokens, "a chunk of {n} tokens, {max_tokens} allowed: {chunk:?}");
        }
        for pair in spans.windows(2) {
            assert!(pair[0].start < pair[1].start, "{pair:?}");
            if pair[1].start > pair[0].end {
                assert!(text[pair[0].end..pair[1].start].trim().is_empty(), "text skipped between {pair:?}");
            }
        }
        assert!(text[..spans.first().map_or(text.len(), |s| s.start)].trim().is_empty());
        assert!(text[spans.last().map_or(0, |s| s.end)..].trim().is_empty());
    }

    #[test]
    fn a_short_text_is_one_trimmed_chunk_and_a_blank_one_none() {
        let encoder = encoder();
        let text = "  \n Vacuum reclaims storage occupied by dead tuples.\n\n ";
        let spans = chunk_spans(&encoder, "", text, 64, 8, &never).unwrap();
        assert_eq!(spans.iter().map(|s| &text[s.clone()]).collect::<Vec<_>>(), ["Vacuum reclaims storage occupied by dead tuples."]);
        assert!(chunk_spans(&encoder, "", " \n\t ", 64, 8, &never).unwrap().is_empty());
        assert!(chunk_spans(&encoder, "", "", 64, 8, &never).unwrap().is_empty());
    }

    #[test]
    fn paragraphs_are_kept_whole_where_they_fit() {
        let encoder = encoder();
        let paragraph = |i: usize| format!("Paragraph {i} explains one thing. It has two sentences about table number {i}.");
        let text = (0..12).map(paragraph).collect::<Vec<_>>().join("\n\n");
        let per = tokens(&encoder, "", &paragraph(10)) - SPECIAL_TOKENS;
        // Room for three paragraphs and a bit, never four.
        let max_tokens = 3 * per + 6 + SPECIAL_TOKENS;
        let spans = chunk_spans(&encoder, "", &text, max_tokens, 0, &never).unwrap();
        check_spans(&encoder, "", &text, max_tokens, &spans);
        for span in &spans {
            let chunk = &text[span.clone()];
            assert!(chunk.starts_with("Paragraph") && chunk.ends_with('.'), "{chunk:?}");
        }
        assert!(spans.len() >= 4 && spans.len() <= 6, "{} chunks", spans.len());
        // With an overlap, a chunk ending at a paragraph break still shares its last tokens.
        let spans = chunk_spans(&encoder, "", &text, per + SPECIAL_TOKENS + 3, 8, &never).unwrap();
        check_spans(&encoder, "", &text, per + SPECIAL_TOKENS + 3, &spans);
        assert!(spans.windows(2).all(|pair| pair[1].start < pair[0].end), "{spans:?}");
    }

    #[test]
    fn sentences_then_words_when_paragraphs_are_too_long() {
        let encoder = encoder();
        let text = "The planner estimates costs. Each path gets a number! Which one wins? The cheapest one. ".repeat(40);
        let spans = chunk_spans(&encoder, "", &text, 40, 0, &never).unwrap();
        check_spans(&encoder, "", &text, 40, &spans);
        for span in &spans[..spans.len() - 1] {
            let chunk = &text[span.clone()];
            assert!(chunk.ends_with(['.', '!', '?']), "not cut at a sentence end: {chunk:?}");
        }
        // One endless sentence: cut between words.
        let words = "lorem ipsum dolor sit amet ".repeat(200);
        let spans = chunk_spans(&encoder, "", &words, 33, 0, &never).unwrap();
        check_spans(&encoder, "", &words, 33, &spans);
        for span in &spans {
            assert!(words[span.clone()].split(' ').all(|w| ["lorem", "ipsum", "dolor", "sit", "amet"].contains(&w)));
        }
    }

    #[test]
    fn neighbours_overlap_by_about_the_overlap() {
        let encoder = encoder();
        let text = "Index scans read the heap in index order while bitmap scans sort the pages first. ".repeat(60);
        for (max_tokens, overlap) in [(64, 8), (64, 20), (100, 0), (40, 19)] {
            let spans = chunk_spans(&encoder, "", &text, max_tokens, overlap, &never).unwrap();
            check_spans(&encoder, "", &text, max_tokens, &spans);
            for pair in spans.windows(2) {
                if overlap == 0 {
                    assert!(pair[1].start >= pair[0].end, "{pair:?}");
                } else {
                    assert!(pair[1].start < pair[0].end, "no overlap at {pair:?}");
                    let shared = tokens(&encoder, "", &text[pair[1].start..pair[0].end]) - SPECIAL_TOKENS;
                    assert!(shared <= overlap + 1, "{shared} tokens shared, overlap {overlap}");
                }
            }
        }
    }

    #[test]
    fn the_instruction_counts_against_the_budget() {
        let encoder = encoder();
        let text = "Autovacuum launches workers per database. ".repeat(50);
        let spans = chunk_spans(&encoder, QUERY_INSTRUCTION, &text, 48, 4, &never).unwrap();
        check_spans(&encoder, QUERY_INSTRUCTION, &text, 48, &spans);
        let instruction = encoder.instruction_len(QUERY_INSTRUCTION).unwrap();
        let error = chunk_spans(&encoder, QUERY_INSTRUCTION, &text, instruction + 2, 0, &never).unwrap_err().to_string();
        assert!(error.contains("has no room for text"), "{error}");
        assert_eq!(chunk_text_budget(&encoder, QUERY_INSTRUCTION, instruction + 2 + MIN_CHUNK_TEXT_TOKENS).unwrap(), 16);
        let error = chunk_text_budget(&encoder, "", 2 + MIN_CHUNK_TEXT_TOKENS - 1).unwrap_err().to_string();
        assert!(error.contains("at least 16 tokens of text"), "{error}");
        let error = chunk_spans(&encoder, "", &text, 40, 20, &never).unwrap_err().to_string();
        assert!(error.contains("an overlap of 20 tokens is more than half of the 38 tokens"), "{error}");
        // A caller that gives up stops the cutting.
        let error = chunk_spans(&encoder, "", &text, 40, 0, &|| true).unwrap_err();
        assert!(matches!(error, Error::Cancelled), "{error}");
    }

    #[test]
    fn any_script_and_text_without_spaces_is_cut_within_budget() {
        let encoder = encoder();
        let mixed = "灯台の光が海を照らす。波は静かだ。Становништво града расте. 🚀🚀🚀 ünïcödé—dash\r\n\t".repeat(30);
        let unbroken = "x".repeat(3000) + &"é".repeat(500);
        for text in [mixed.as_str(), unbroken.as_str()] {
            for (max_tokens, overlap) in [(18, 0), (24, 4), (200, 50)] {
                let spans = chunk_spans(&encoder, "", text, max_tokens, overlap, &never).unwrap();
                check_spans(&encoder, "", text, max_tokens, &spans);
            }
        }
        let spans = chunk_spans(&encoder, "", &mixed, 40, 0, &never).unwrap();
        for span in &spans[..spans.len() - 1] {
            let chunk = &mixed[span.clone()];
            assert!(chunk.ends_with(['。', '.']) || chunk.ends_with("dash"), "cut mid-sentence: {chunk:?}");
        }
    }

    #[test]
    fn a_long_document_is_read_a_window_at_a_time() {
        let encoder = encoder();
        let sentence = "A long manual: chapter after chapter of prose, each sentence a little different. ";
        let text = sentence.repeat(20_000);
        let spans = chunk_spans(&encoder, "", &text, 512, 64, &never).unwrap();
        check_spans(&encoder, "", &text, 512, &spans);
        let total = (tokens(&encoder, "", sentence) - SPECIAL_TOKENS) * 20_000;
        assert!(spans.len() > total / 510 && spans.len() < total / (510 - 2 * 64), "{} chunks of {total} tokens", spans.len());
    }
}

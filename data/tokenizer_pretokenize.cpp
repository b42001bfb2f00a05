// Pre-tokenizer stages (HF Split and ByteLevel) and the stage lists of the two supported styles.
#include <string>
#include <string_view>
#include <vector>

#include "data/tokenizer_impl.h"
#include "kernels/error.h"

namespace dsx::data::detail {

const char* const kGpt2SplitPattern =
    "'s|'t|'re|'ve|'m|'ll|'d| ?\\p{L}+| ?\\p{N}+| ?[^\\s\\p{L}\\p{N}]+|\\s+(?!\\S)|\\s+";

namespace {

PreTokenizerStage split_stage(std::string pattern) {
  PreTokenizerStage stage;
  stage.kind = PreTokenizerStage::Kind::kSplit;
  stage.pattern = std::move(pattern);
  return stage;
}

PreTokenizerStage byte_level_stage(bool use_regex) {
  PreTokenizerStage stage;
  stage.kind = PreTokenizerStage::Kind::kByteLevel;
  stage.add_prefix_space = false;
  stage.trim_offsets = true;
  stage.use_regex = use_regex;
  return stage;
}

// Non-overlapping occurrences of a literal, left to right (HF escapes it into a regex).
void find_literal(std::string_view text, std::string_view literal, std::vector<Match>& out) {
  out.clear();
  if (literal.empty()) return;
  for (size_t pos = text.find(literal); pos != std::string_view::npos; pos = text.find(literal, pos + literal.size()))
    out.push_back({pos, pos + literal.size()});
}

}  // namespace

std::vector<PreTokenizerStage> deepseek_v3_pre_tokenizer() {
  return {
      split_stage("\\p{N}{1,3}"),
      // CJK unified ideographs U+4E00..U+9FA5, hiragana and katakana.
      split_stage("[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+"),
      // tokenizer.json holds literal CR and LF characters in this pattern, not \r and \n.
      split_stage("[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+| "
                  "?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+"),
      byte_level_stage(false),
  };
}

std::vector<PreTokenizerStage> gpt2_pre_tokenizer() {
  return {byte_level_stage(true)};
}

PreTokenizer::PreTokenizer(const std::vector<PreTokenizerStage>& stages, const std::string& source) {
  for (size_t i = 0; i < stages.size(); ++i) {
    const PreTokenizerStage& stage = stages[i];
    const std::string where = source + ": pre_tokenizer stage " + std::to_string(i);
    Step step;
    if (stage.kind == PreTokenizerStage::Kind::kByteLevel) {
      step.prefix_space = stage.add_prefix_space;
      if (stage.use_regex) {
        step.matcher = Step::Matcher::kRegex;
        step.regex.emplace(kGpt2SplitPattern, where);
      }
    } else {
      if (stage.behavior != "Isolated" && stage.behavior != "Removed")
        throw UserError(where + ": Split behavior '" + stage.behavior +
                        "' is not supported (dsx supports Isolated and Removed)");
      step.remove_matches = stage.behavior == "Removed";
      step.invert = stage.invert;
      if (stage.pattern_is_regex) {
        step.matcher = Step::Matcher::kRegex;
        step.regex.emplace(stage.pattern, where);
      } else {
        step.matcher = Step::Matcher::kLiteral;
        step.literal = stage.pattern;
      }
    }
    steps_.push_back(std::move(step));
  }
}

// HF's Split: matches and the gaps between them become pieces in text order; with Removed the
// matched pieces (or, inverted, the gaps) are dropped. Empty pieces are dropped.
void PreTokenizer::split_piece(const Step& step, std::string_view piece, std::vector<std::string_view>& out) const {
  thread_local std::vector<Match> matches;
  if (step.matcher == Step::Matcher::kRegex)
    step.regex->find_all(piece, matches);
  else
    find_literal(piece, step.literal, matches);
  out.clear();
  auto add = [&](size_t begin, size_t end, bool is_match) {
    if (end == begin) return;
    if (step.remove_matches && (is_match != step.invert)) return;
    out.push_back(piece.substr(begin, end - begin));
  };
  size_t previous = 0;
  for (const Match& m : matches) {
    if (m.begin != previous) add(previous, m.begin, false);
    add(m.begin, m.end, true);
    previous = m.end;
  }
  if (previous != piece.size()) add(previous, piece.size(), false);
}

}  // namespace dsx::data::detail

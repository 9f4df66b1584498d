// The small JSON reader of the C++ examples: what manifest.json and items.json use (objects,
// arrays, strings with \u escapes, numbers, true / false / null). A real service would use its
// JSON library.
#pragma once

#include <cctype>
#include <cstdint>
#include <fstream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace mp4sr_json {

struct Json {
  enum Kind { Null, Bool, Number, String, Array, Object } kind = Null;
  double number = 0;
  std::string string;
  std::vector<Json> array;
  std::map<std::string, Json> object;

  const Json& operator[](const std::string& key) const {
    auto it = object.find(key);
    if (kind != Object || it == object.end()) throw std::runtime_error("manifest: no key '" + key + "'");
    return it->second;
  }
};

class JsonReader {
 public:
  explicit JsonReader(const std::string& text) : s_(text) {}

  Json Parse() {
    Json value = Value();
    Skip();
    if (i_ != s_.size()) Fail("trailing characters");
    return value;
  }

 private:
  const std::string& s_;
  size_t i_ = 0;

  [[noreturn]] void Fail(const std::string& what) const {
    throw std::runtime_error("JSON: " + what + " at offset " + std::to_string(i_));
  }
  void Skip() {
    while (i_ < s_.size() && std::isspace(static_cast<unsigned char>(s_[i_]))) ++i_;
  }
  bool Consume(char c) {
    Skip();
    if (i_ < s_.size() && s_[i_] == c) return ++i_, true;
    return false;
  }
  void Expect(char c) {
    if (!Consume(c)) Fail(std::string("expected '") + c + "'");
  }

  Json Value() {
    Skip();
    if (i_ >= s_.size()) Fail("unexpected end");
    Json v;
    char c = s_[i_];
    if (c == '{') {
      v.kind = Json::Object, ++i_;
      if (Consume('}')) return v;
      do {
        Skip();
        std::string key = Str();
        Expect(':');
        v.object[key] = Value();
      } while (Consume(','));
      Expect('}');
    } else if (c == '[') {
      v.kind = Json::Array, ++i_;
      if (Consume(']')) return v;
      do v.array.push_back(Value());
      while (Consume(','));
      Expect(']');
    } else if (c == '"') {
      v.kind = Json::String, v.string = Str();
    } else if (s_.compare(i_, 4, "true") == 0 || s_.compare(i_, 5, "false") == 0) {
      v.kind = Json::Bool, v.number = s_[i_] == 't', i_ += s_[i_] == 't' ? 4 : 5;
    } else if (s_.compare(i_, 4, "null") == 0) {
      i_ += 4;
    } else {
      size_t used = 0;
      v.kind = Json::Number, v.number = std::stod(s_.substr(i_, 32), &used), i_ += used;
    }
    return v;
  }

  std::string Str() {
    if (i_ >= s_.size() || s_[i_] != '"') Fail("expected a string");
    std::string out;
    for (++i_; i_ < s_.size() && s_[i_] != '"'; ++i_) {
      if (s_[i_] != '\\') {
        out += s_[i_];
        continue;
      }
      char e = s_[++i_];
      if (e == 'u') {
        AppendUtf8(out, CodePoint());
        continue;
      }
      const std::string from = "\"\\/bfnrt", to = "\"\\/\b\f\n\r\t";
      size_t k = from.find(e);
      if (k == std::string::npos) Fail("bad escape");
      out += to[k];
    }
    if (i_ >= s_.size()) Fail("unterminated string");
    ++i_;
    return out;
  }

  // \uXXXX, with a following \uXXXX low surrogate for characters beyond the BMP (Python's json
  // writes non-ASCII that way); i_ is left on the last hex digit.
  unsigned CodePoint() {
    unsigned cp = Hex4();
    if (cp >= 0xD800 && cp < 0xDC00 && s_.compare(i_ + 1, 2, "\\u") == 0) {
      i_ += 2;
      cp = 0x10000 + ((cp - 0xD800) << 10) + (Hex4() - 0xDC00);
    }
    return cp;
  }
  unsigned Hex4() {
    if (i_ + 4 >= s_.size()) Fail("short \\u escape");
    unsigned cp = std::stoul(s_.substr(i_ + 1, 4), nullptr, 16);
    i_ += 4;
    return cp;
  }
  static void AppendUtf8(std::string& out, unsigned cp) {
    if (cp < 0x80) {
      out += static_cast<char>(cp);
    } else if (cp < 0x800) {
      out += static_cast<char>(0xC0 | (cp >> 6)), out += static_cast<char>(0x80 | (cp & 0x3F));
    } else if (cp < 0x10000) {
      out += static_cast<char>(0xE0 | (cp >> 12)), out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F));
      out += static_cast<char>(0x80 | (cp & 0x3F));
    } else {
      out += static_cast<char>(0xF0 | (cp >> 18)), out += static_cast<char>(0x80 | ((cp >> 12) & 0x3F));
      out += static_cast<char>(0x80 | ((cp >> 6) & 0x3F)), out += static_cast<char>(0x80 | (cp & 0x3F));
    }
  }
};

Json ReadJson(const std::string& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) throw std::runtime_error("cannot open " + path);
  std::stringstream buffer;
  buffer << in.rdbuf();
  return JsonReader(buffer.str()).Parse();
}

}  // namespace mp4sr_json

// Score one history with the exported MP4SR scorer through onnxruntime's C++ API.
//
//   score ARTIFACT_DIR ITEM_ID [ITEM_ID ...]     (the history, oldest first, original item ids)
//
// Prints the top 10 (at most the manifest's top_k) as "item_id<TAB>score" lines, best first.
// Exit status 3: the scorer scans in int8 and its bound cannot certify these 10 (see below).
// Everything comes from the artifact directory's manifest.json (docs/artifacts.md): the scorer
// file, its input and output names, max_len, the vocabulary file. The small JSON reader below
// covers what manifest.json and items.json use; a real service would use its JSON library and
// also check each file's sha256 against the manifest.

#include <onnxruntime_cxx_api.h>

#include <algorithm>
#include <cctype>
#include <cstdint>
#include <fstream>
#include <iostream>
#include <map>
#include <sstream>
#include <stdexcept>
#include <string>
#include <vector>

namespace {

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

}  // namespace

int main(int argc, char** argv) try {
  if (argc < 3) {
    std::cerr << "usage: " << argv[0] << " ARTIFACT_DIR ITEM_ID [ITEM_ID ...]\n";
    return 2;
  }
  const std::string dir = argv[1];
  const Json manifest = ReadJson(dir + "/manifest.json");
  if (manifest["schema"].string != "mp4sr-artifacts/2" || manifest["padding"].string != "right") {
    throw std::runtime_error("unsupported manifest schema or padding: " + manifest["schema"].string);
  }
  const Json& scorer = manifest["models"]["scorer"];
  const auto max_len = static_cast<size_t>(manifest["max_len"].number);

  // Item index i + 1 is items[i] of the vocabulary; index 0 is padding.
  const Json vocabulary = ReadJson(dir + "/" + manifest["vocabulary"].string);
  const std::vector<Json>& items = vocabulary["items"].array;
  std::map<std::string, int64_t> index;
  for (size_t i = 0; i < items.size(); ++i) index[items[i].string] = static_cast<int64_t>(i) + 1;

  // One history needs no padding: shape [1, L], its most recent max_len items.
  std::vector<int64_t> ids;
  for (int a = std::max(2, argc - static_cast<int>(max_len)); a < argc; ++a) {
    auto it = index.find(argv[a]);
    if (it == index.end()) throw std::runtime_error(std::string("unknown item id: ") + argv[a]);
    ids.push_back(it->second);
  }

  Ort::Env env(ORT_LOGGING_LEVEL_WARNING, "mp4sr-score");
  Ort::SessionOptions options;
  Ort::Session session(env, (dir + "/" + scorer["file"].string).c_str(), options);
  const int64_t shape[2] = {1, static_cast<int64_t>(ids.size())};
  Ort::MemoryInfo memory = Ort::MemoryInfo::CreateCpu(OrtArenaAllocator, OrtMemTypeDefault);
  Ort::Value input = Ort::Value::CreateTensor<int64_t>(memory, ids.data(), ids.size(), shape, 2);

  // Manifest order: input ids; outputs scores, items, user, and with an int8 catalogue scan
  // (export --int8-scan) bound: no item left out of the top K scores above it.
  const std::vector<Json>& outputs = scorer["outputs"].array;
  const bool has_bound = outputs.size() > 3 && outputs[3]["name"].string == "bound";
  const std::string input_name = scorer["inputs"].array.at(0)["name"].string;
  std::vector<std::string> names = {outputs.at(0)["name"].string, outputs.at(1)["name"].string};
  if (has_bound) names.push_back(outputs[3]["name"].string);
  const char* input_names[] = {input_name.c_str()};
  std::vector<const char*> output_names;
  for (const std::string& name : names) output_names.push_back(name.c_str());
  std::vector<Ort::Value> out = session.Run(Ort::RunOptions{nullptr}, input_names, &input, 1,
                                            output_names.data(), output_names.size());

  const float* scores = out[0].GetTensorData<float>();
  const int64_t* top = out[1].GetTensorData<int64_t>();
  const int64_t k = std::min<int64_t>(10, out[1].GetTensorTypeAndShapeInfo().GetShape()[1]);
  std::cout.precision(7);
  for (int64_t r = 0; r < k; ++r) {
    std::cout << items.at(static_cast<size_t>(top[r] - 1)).string << '\t' << scores[r] << '\n';
  }
  // The top k is exact when its k-th score reaches the bound; otherwise an item the int8 scan
  // left out may belong in it, and a service ranks this history again in full precision
  // (user output . the table rebuilt from item_inputs.npy, docs/artifacts.md).
  if (has_bound && scores[k - 1] < out[2].GetTensorData<float>()[0]) {
    std::cerr << "not certified: rank this history again in full precision\n";
    return 3;
  }
  return 0;
} catch (const std::exception& e) {
  std::cerr << "error: " << e.what() << '\n';
  return 1;
}

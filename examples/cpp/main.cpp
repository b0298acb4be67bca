// adapedit_cpp ENGINE_DIR SOURCE TARGET OUT_DIR [STEPS] [SEED] [--image PATH [--inversion NAME]]
//
// Embeds the adapedit runtime in a C++ program through pybind11's embedded interpreter: loads an
// engine folder ("adapedit build") once, runs one edit, receives both images as uint8 buffers
// (the Python buffer protocol, copied into C++ memory) and writes OUT_DIR/source.png and
// OUT_DIR/edited.png with a small PNG writer of its own. With --image the edit starts from that
// PNG, JPEG or WebP file (SOURCE describes it): its bytes are read in C++ and handed over as
// Python bytes; --inversion picks direct (default), ddim or npi.
//
// A Python exception becomes an adapedit::Error (a std::runtime_error) whose message is the
// Python class name and the exception's message, unchanged. Exit codes: 0 done, 1 a failure,
// 2 bad input (usage, or an adapedit InputError such as a prompt over 77 tokens), the message
// on stderr.
//
// The interpreter: the Python executable named by the environment variable ADAPEDIT_PYTHON, or
// else the one CMake was configured with (ADAPEDIT_PYTHON_EXECUTABLE, normally the project's
// virtualenv python). It becomes the interpreter's program name, so Python finds its standard
// library and, through the venv's pyvenv.cfg, the venv's site-packages: no PYTHONPATH or
// PYTHONHOME needed.

#include <pybind11/embed.h>

#include <array>
#include <cstdint>
#include <cstdlib>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <iterator>
#include <optional>
#include <stdexcept>
#include <string>
#include <utility>
#include <vector>

#ifndef ADAPEDIT_PYTHON_EXECUTABLE
#define ADAPEDIT_PYTHON_EXECUTABLE ""
#endif

namespace py = pybind11;

namespace adapedit {

// A Python exception raised by adapedit, as a C++ exception: "<PythonClass>: <message>".
class Error : public std::runtime_error {
public:
    Error(std::string type, const std::string &message, bool input_error)
        : std::runtime_error(type + ": " + message), type_(std::move(type)),
          input_error_(input_error) {}

    // The Python class name, e.g. "PromptError".
    const std::string &type() const { return type_; }
    // An adapedit.errors.InputError: bad prompts or options, fixable by the caller.
    bool input_error() const { return input_error_; }

private:
    std::string type_;
    bool input_error_;
};

struct Image {
    std::size_t height = 0, width = 0;
    std::vector<std::uint8_t> rgb;  // row-major [height][width][3]
};

struct WordTau {
    std::string word;
    double tau;
};

struct Result {
    Image source, edited;
    std::vector<WordTau> tau;
    double tau_self = 0.0, total_s = 0.0;
    std::string calibration;  // computed | cached | off
};

namespace {

bool is_input_error(const py::error_already_set &e) {
    try {
        return e.matches(py::module_::import("adapedit.errors").attr("InputError"));
    } catch (const py::error_already_set &) {
        return false;  // adapedit itself cannot be imported
    }
}

// Runs f, turning a Python exception into an adapedit::Error with its message intact.
template <class F>
auto translated(F &&f) -> decltype(f()) {
    try {
        return f();
    } catch (const py::error_already_set &e) {
        throw Error(py::str(e.type().attr("__name__")), py::str(e.value()), is_input_error(e));
    }
}

// A C-contiguous uint8 [H, W, 3] buffer (Python's buffer protocol), copied into C++ memory.
Image to_image(const py::handle &obj, const char *name) {
    py::buffer_info b = py::reinterpret_borrow<py::buffer>(obj).request();
    const bool ok = b.format == py::format_descriptor<std::uint8_t>::format() && b.ndim == 3 &&
                    b.shape[2] == 3 && b.strides[2] == 1 && b.strides[1] == 3 &&
                    b.strides[0] == 3 * b.shape[1];
    if (!ok) {
        throw std::runtime_error(std::string(name) + ": expected a C-contiguous uint8 [H, W, 3]");
    }
    Image img;
    img.height = static_cast<std::size_t>(b.shape[0]);
    img.width = static_cast<std::size_t>(b.shape[1]);
    const auto *p = static_cast<const std::uint8_t *>(b.ptr);
    img.rgb.assign(p, p + img.height * img.width * 3);
    return img;
}

}  // namespace

// An EditSession built once from an engine folder; edit() many times.
class Session {
public:
    explicit Session(const std::string &engine_dir) {
        translated([&] {
            api_ = py::module_::import("adapedit.runtime.api");
            session_ = py::module_::import("adapedit").attr("EditSession")(engine_dir);
        });
    }

    // image: the encoded file's bytes (none: a generated source); inversion: empty for the
    // default; calibration_steps: none for a full calibration pass.
    Result edit(const std::string &source, const std::string &target, long long steps,
                long long seed, const std::optional<std::string> &image = std::nullopt,
                const std::string &inversion = {},
                std::optional<long long> calibration_steps = std::nullopt) {
        return translated([&] {
            py::dict options;
            options["steps"] = steps;
            options["seed"] = seed;
            if (calibration_steps) options["calibration_steps"] = *calibration_steps;
            if (image) options["image"] = py::bytes(*image);
            if (!inversion.empty()) options["inversion"] = inversion;
            py::dict r = api_.attr("plain_edit")(session_, source, target, **options);
            Result out;
            out.source = to_image(r["source_image"], "source_image");
            out.edited = to_image(r["edited_image"], "edited_image");
            for (const auto &w : r["tau"]) {
                out.tau.push_back({py::str(w["word"]), w["tau"].cast<double>()});
            }
            out.tau_self = r["tau_self"].cast<double>();
            out.total_s = r["timings_s"]["total"].cast<double>();
            out.calibration = py::str(r["calibration"]);
            return out;
        });
    }

private:
    py::object api_, session_;
};

// -- PNG: 8-bit RGB, zlib "stored" (uncompressed) blocks; no library needed ----------------------

namespace {

std::uint32_t crc32(const std::uint8_t *data, std::size_t n, std::uint32_t crc) {
    static const auto table = [] {
        std::array<std::uint32_t, 256> t{};
        for (std::uint32_t i = 0; i < 256; ++i) {
            std::uint32_t c = i;
            for (int k = 0; k < 8; ++k) c = (c & 1) ? 0xEDB88320u ^ (c >> 1) : c >> 1;
            t[i] = c;
        }
        return t;
    }();
    crc = ~crc;
    for (std::size_t i = 0; i < n; ++i) crc = table[(crc ^ data[i]) & 0xFF] ^ (crc >> 8);
    return ~crc;
}

void put_u32(std::vector<std::uint8_t> &v, std::uint32_t x) {
    for (int s = 24; s >= 0; s -= 8) v.push_back(static_cast<std::uint8_t>(x >> s));
}

void put_chunk(std::vector<std::uint8_t> &png, const char *type,
               const std::vector<std::uint8_t> &data) {
    put_u32(png, static_cast<std::uint32_t>(data.size()));
    const std::size_t start = png.size();
    png.insert(png.end(), type, type + 4);
    png.insert(png.end(), data.begin(), data.end());
    put_u32(png, crc32(png.data() + start, png.size() - start, 0));
}

}  // namespace

void write_png(const std::filesystem::path &path, const Image &img) {
    std::vector<std::uint8_t> raw;  // each row: filter type 0, then RGB
    raw.reserve(img.height * (1 + img.width * 3));
    for (std::size_t y = 0; y < img.height; ++y) {
        raw.push_back(0);
        const auto row = img.rgb.begin() + static_cast<std::ptrdiff_t>(y * img.width * 3);
        raw.insert(raw.end(), row, row + static_cast<std::ptrdiff_t>(img.width * 3));
    }
    std::vector<std::uint8_t> z = {0x78, 0x01};  // zlib header: deflate, 32 KiB window
    std::uint32_t a = 1, b = 0;                  // Adler-32
    for (std::size_t pos = 0; pos < raw.size();) {
        const std::size_t n = std::min<std::size_t>(65535, raw.size() - pos);
        z.push_back(pos + n == raw.size() ? 1 : 0);  // BFINAL, BTYPE = stored
        z.push_back(n & 0xFF);
        z.push_back(n >> 8);
        z.push_back(~n & 0xFF);
        z.push_back((~n >> 8) & 0xFF);
        for (std::size_t i = pos; i < pos + n; ++i) {
            a = (a + raw[i]) % 65521;
            b = (b + a) % 65521;
        }
        z.insert(z.end(), raw.begin() + static_cast<std::ptrdiff_t>(pos),
                 raw.begin() + static_cast<std::ptrdiff_t>(pos + n));
        pos += n;
    }
    put_u32(z, (b << 16) | a);

    std::vector<std::uint8_t> png = {0x89, 'P', 'N', 'G', '\r', '\n', 0x1A, '\n'};
    std::vector<std::uint8_t> ihdr;
    put_u32(ihdr, static_cast<std::uint32_t>(img.width));
    put_u32(ihdr, static_cast<std::uint32_t>(img.height));
    ihdr.insert(ihdr.end(), {8, 2, 0, 0, 0});  // 8 bits, RGB, deflate, no filter, no interlace
    put_chunk(png, "IHDR", ihdr);
    put_chunk(png, "IDAT", z);
    put_chunk(png, "IEND", {});

    std::ofstream f(path, std::ios::binary);
    f.write(reinterpret_cast<const char *>(png.data()), static_cast<std::streamsize>(png.size()));
    if (!f) throw std::runtime_error("cannot write " + path.string());
}

// The interpreter's configuration: the program name is the Python executable to run as, so that
// a virtualenv's python brings its site-packages.
PyConfig python_config() {
    PyConfig config;
    PyConfig_InitPythonConfig(&config);
    config.parse_argv = 0;
    const char *env = std::getenv("ADAPEDIT_PYTHON");
    const std::string exe = env && *env ? env : ADAPEDIT_PYTHON_EXECUTABLE;
    if (!exe.empty()) {
        PyStatus status = PyConfig_SetBytesString(&config, &config.program_name, exe.c_str());
        if (PyStatus_Exception(status)) {
            PyConfig_Clear(&config);
            throw std::runtime_error("cannot use the Python executable " + exe);
        }
    }
    return config;
}

}  // namespace adapedit

namespace {

// A whole file's bytes, or std::invalid_argument naming it.
std::string read_file(const std::string &path) {
    std::ifstream f(path, std::ios::binary);
    if (!f || std::filesystem::is_directory(path)) {
        throw std::invalid_argument("cannot read the image file '" + path + "'");
    }
    std::string data((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
    if (f.bad()) throw std::invalid_argument("cannot read the image file '" + path + "'");
    return data;
}

// A whole-string integer argument, or std::invalid_argument.
long long integer(const char *text, const char *name) {
    std::size_t used = 0;
    long long v = 0;
    try {
        v = std::stoll(text, &used);
    } catch (const std::logic_error &) {
        used = 0;
    }
    if (used == 0 || text[used] != '\0') {
        throw std::invalid_argument(std::string(name) + " must be an integer, got '" + text + "'");
    }
    return v;
}

}  // namespace

int main(int argc, char **argv) {
    std::vector<std::string> args;  // the positional arguments
    std::string image_path, inversion, calibration_steps;
    bool usage = false;
    for (int i = 1; i < argc; ++i) {
        const std::string a = argv[i];
        if (a == "--image" || a == "--inversion" || a == "--calibration-steps") {
            if (i + 1 == argc) usage = true;
            else (a == "--image" ? image_path
                  : a == "--inversion" ? inversion
                                       : calibration_steps) = argv[++i];
        } else {
            args.push_back(a);
        }
    }
    if (usage || args.size() < 4 || args.size() > 6 || (!inversion.empty() && image_path.empty())) {
        std::cerr << "usage: " << argv[0]
                  << " ENGINE_DIR SOURCE TARGET OUT_DIR [STEPS] [SEED] [--image PATH "
                     "[--inversion direct|ddim|npi]] [--calibration-steps K]\n";
        return 2;
    }
    long long steps = 50, seed = 0;
    std::optional<long long> k;
    std::optional<std::string> image;
    try {
        if (args.size() > 4) steps = integer(args[4].c_str(), "STEPS");
        if (!calibration_steps.empty()) k = integer(calibration_steps.c_str(), "K");
        if (args.size() > 5) seed = integer(args[5].c_str(), "SEED");
        if (!image_path.empty()) image = read_file(image_path);
    } catch (const std::invalid_argument &e) {
        std::cerr << "adapedit_cpp: error: " << e.what() << '\n';
        return 2;
    }
    const std::filesystem::path out_dir = args[3];
    try {
        adapedit::Result r;
        {
            PyConfig config = adapedit::python_config();
            py::scoped_interpreter python(&config, 0, nullptr, false);
            adapedit::Session session(args[0]);
            r = session.edit(args[1], args[2], steps, seed, image, inversion, k);
        }  // every Python object is gone before the interpreter ends

        std::filesystem::create_directories(out_dir);
        adapedit::write_png(out_dir / "source.png", r.source);
        adapedit::write_png(out_dir / "edited.png", r.edited);
        std::cout << "τ:";
        for (const auto &w : r.tau) std::cout << ' ' << w.word << '=' << w.tau;
        std::cout << "; τ_self=" << r.tau_self << "; " << r.edited.width << "×" << r.edited.height
                  << " px; calibration " << r.calibration << "; " << r.total_s << " s → " << (out_dir / "source.png").string() << ", "
                  << (out_dir / "edited.png").string() << '\n';
        return 0;
    } catch (const adapedit::Error &e) {
        std::cerr << "adapedit_cpp: error: " << e.what() << '\n';
        return e.input_error() ? 2 : 1;
    } catch (const std::exception &e) {
        std::cerr << "adapedit_cpp: error: " << e.what() << '\n';
        return 1;
    }
}

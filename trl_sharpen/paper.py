"""The paper trl_sharpen implements, as TRL's trainers cite it in model cards (`_paper`)."""

import textwrap


SHARPENING_PAPER = {
    "title": "Self-Improvement in Language Models: The Sharpening Mechanism",
    "id": "2412.01951",
    # docstyle-ignore
    "citation": textwrap.dedent("""\
        @inproceedings{huang2025sharpening,
            title        = {{Self-Improvement in Language Models: The Sharpening Mechanism}},
            author       = {Audrey Huang and Adam Block and Dylan J. Foster and Dhruv Rohatgi and Cyril Zhang and Max Simchowitz and Jordan T. Ash and Akshay Krishnamurthy},
            year         = 2025,
            booktitle    = {The Thirteenth International Conference on Learning Representations, {ICLR} 2025},
            url          = {https://openreview.net/forum?id=WJaUkwci9o},
        }"""),
}
